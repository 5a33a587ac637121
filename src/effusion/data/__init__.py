"""Data sources, augmentation and the resumable batch stream."""

from effusion.data.loader import (BatchLoader, BatchStream, WeightedBatchStream, augment,
                                  class_weights, make_stream, rescale, stage_size,
                                  to_model_range, to_uint8)
from effusion.data.sources import (DataError, ImageSet, load_source, long_tail_counts,
                                   long_tailed, resolve_data, split, subset)

__all__ = ["BatchLoader", "BatchStream", "DataError", "ImageSet", "WeightedBatchStream", "augment",
           "class_weights", "load_source", "long_tail_counts", "long_tailed", "make_stream",
           "rescale", "resolve_data", "split", "stage_size", "subset", "to_model_range", "to_uint8"]
