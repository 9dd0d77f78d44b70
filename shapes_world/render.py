"""Sampling the shapes model with sae_core interventions attached through ``sae_core.torch_hooks``.

The same DDIM loop as ``shapes_world.sample`` (cond rows first, then uncond), with the block hooks of
``attach_interventions`` and a ``track_timestep`` pre-hook that tells every intervention the step.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Mapping, Sequence

import torch
from torch import Tensor

from sae_core.collector import ConceptCollector
from sae_core.denoised import DenoisedFill
from sae_core.intervention import BlockIntervention
from sae_core.torch_hooks import StepHolder, attach_interventions, track_timestep

from .model import ShapesModel
from .sample import sample

logger = logging.getLogger(__name__)

# The CFG layout of shapes_world.sample: [cond rows; uncond rows].
CHUNKS: tuple[int, ...] = (0, 1)


def scheduler_timesteps(model: ShapesModel, steps: int) -> Tensor:
    sched = model.ddim_scheduler()
    sched.set_timesteps(steps)
    return sched.timesteps.clone()


@torch.no_grad()
def render(
    model: ShapesModel,
    captions: Sequence[str],
    seed: int = 0,
    steps: int = 20,
    cfg: float = 3.0,
    interventions: Mapping[str, BlockIntervention | ConceptCollector | Sequence] | None = None,
) -> Tensor:
    """Images [B, 3, S, S] in [0, 1]; ``interventions`` {unet module name: intervention(s)} act on every step.

    Hooks are attached to ``model.unet`` for this call only and removed afterwards, also on errors.
    Same seed and captions -> the same starting noise as without interventions, so outputs compare pixel by pixel.
    """
    holder = StepHolder()
    chunks = CHUNKS if cfg != 1.0 else (0,)
    flat = [iv for ivs in (interventions or {}).values() for iv in (ivs if isinstance(ivs, (list, tuple)) else [ivs])]
    fill = DenoisedFill(flat)
    with ExitStack() as stack:
        if interventions:
            stack.enter_context(track_timestep(model.unet, holder, chunks, scheduler_timesteps(model, steps)))
            stack.enter_context(attach_interventions(model.unet, dict(interventions), holder))
        return sample(model, list(captions), seed=seed, steps=steps, cfg=cfg, denoised_fill=fill if fill else None)
