"""Diffusion math: schedules, prediction objectives, the Denoiser contract, samplers."""

from effusion.diffusion.guidance import GuidedDenoiser
from effusion.diffusion.objective import Denoiser, NetworkDenoiser, from_x0, loss_weight, target, to_x0
from effusion.diffusion.samplers import (SAMPLERS, sample, sample_consistency, sample_ddim,
                                         sample_ddpm, sample_dpmpp_2m, timesteps)
from effusion.diffusion.schedule import Schedule, make_betas, schedule_for

__all__ = ["Denoiser", "GuidedDenoiser", "NetworkDenoiser", "SAMPLERS", "Schedule", "from_x0", "loss_weight",
           "make_betas", "sample", "sample_consistency", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "schedule_for", "target",
           "timesteps", "to_x0"]
