"""Sample quality, offline: FID, KID, precision/recall, class accuracy, coverage, bits/dim."""

from effusion.evaluate.evaluate import (ema_sweep, evaluate_images, evaluate_run,
                                        guidance_sweep, load_image_array, per_class_scores, score)
from effusion.evaluate.features import (FeatureScorer, NoFeatureClassifier, cache_dir,
                                        default_feature_classifier)
from effusion.evaluate.likelihood import bits_per_dim
from effusion.evaluate.metrics import class_accuracy, coverage, fid, kid, precision_recall

__all__ = ["FeatureScorer", "bits_per_dim", "cache_dir", "class_accuracy", "coverage",
           "NoFeatureClassifier", "default_feature_classifier", "ema_sweep", "evaluate_images",
           "evaluate_run", "fid", "guidance_sweep", "kid", "load_image_array", "per_class_scores",
           "precision_recall", "score"]
