"""What effusion trains: the diffusion, VAE and classifier recipes, each a `Recipe` (its
data and network) with a `Task` (its loss, periodic work and final artifact) that the
shared loop in `effusion.train.loop` runs.

    from effusion import load_config
    from effusion.recipes import train
    train(load_config(None, ["train.max_minutes=5"]), "runs/mnist")
"""

from __future__ import annotations

from pathlib import Path

from effusion.config import Config
from effusion.recipes.classifier import ClassifierRecipe, ClassifierTask, feature_classifier
from effusion.recipes.configs import (CLASSIFIER_DEFAULTS, VAE_DEFAULTS, classifier_config,
                                      vae_config)
from effusion.recipes.distill import distill_guidance, distill_steps, distill_student
from effusion.recipes.generative import DiffusionRecipe, DiffusionTask, VAERecipe, VAETask
from effusion.train.loop import Recipe, TrainResult
from effusion.train.loop import train as run_loop

RECIPES: dict[str, type] = {"unet": DiffusionRecipe, "diffusers_unet2d": DiffusionRecipe,
                            "vae": VAERecipe, "mlp": ClassifierRecipe,
                            "cnn": ClassifierRecipe, "convnet": ClassifierRecipe}


def recipe_for(cfg: Config) -> Recipe:
    """A fresh recipe for the config's `model.arch`."""
    return RECIPES[cfg.model.arch]()


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, fresh: bool = False,
          progress: bool = True) -> TrainResult:
    """Train the configured model (the U-Net, the VAE, or a classifier for model.arch
    mlp / cnn / convnet), writing everything into `run_dir`.

    Args:
        resume: continue from the latest checkpoint exactly where it stopped.
        fresh: delete the run's old checkpoints, samples and logs first.
        progress: show a progress bar.
    """
    return run_loop(cfg, run_dir, recipe_for(cfg), resume=resume, fresh=fresh,
                    progress=progress)


__all__ = ["CLASSIFIER_DEFAULTS", "ClassifierRecipe", "ClassifierTask", "DiffusionRecipe",
           "DiffusionTask", "RECIPES", "VAERecipe", "VAETask", "VAE_DEFAULTS",
           "classifier_config", "distill_guidance", "distill_steps", "distill_student", "feature_classifier", "recipe_for", "train",
           "vae_config"]
