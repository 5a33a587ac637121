"""Data sources, augmentation and the resumable batch stream."""

from effusion.data.loader import BatchLoader, BatchStream, augment, to_model_range, to_uint8
from effusion.data.sources import DataError, ImageSet, load_source, split, subset

__all__ = ["BatchLoader", "BatchStream", "DataError", "ImageSet", "augment", "load_source", "split", "subset",
           "to_model_range",
           "to_uint8"]
