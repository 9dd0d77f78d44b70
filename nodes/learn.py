"""Learn Concept pieces that need no ComfyUI: prompt parsing, the default contrast set, the code collector."""

from __future__ import annotations

import re

import torch
from einops import rearrange
from torch import Tensor

try:
    from ..sae_core.intervention import StepInfo, chunk_rows
except ImportError:  # imported as top-level `nodes`
    from sae_core.intervention import StepInfo, chunk_rows

CONTRAST_NAME = "contrast"

# Generic scenes of many kinds: SAeUron's mu_notc is "everything else", and a varied set keeps one
# contrast prompt from dominating the score of latents that merely encode photo style or layout.
DEFAULT_CONTRAST = (
    "a photo of a mountain landscape",
    "a busy city street at night",
    "a bowl of fruit on a wooden table",
    "a portrait of a woman smiling",
    "an abstract painting with bright colors",
    "a red car parked on the road",
    "a cat sleeping on a sofa",
    "a plate of pasta",
    "a beach with palm trees",
    "an old castle on a hill",
)


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line; lines starting with '#' are comments."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def parse_latent_ids(text: str) -> list[int]:
    """'12, 40 7' -> [12, 40, 7]."""
    parts = [p for p in re.split(r"[\s,;]+", text.strip()) if p]
    bad = [p for p in parts if not re.fullmatch(r"\d+", p)]
    if bad:
        raise ValueError(f"latent ids {text!r}: {bad} are not non-negative integers; type ids like '12, 40, 7'")
    return [int(p) for p in parts]


class CodeCollector:
    """Recording intervention: SAE codes of the cond rows -> accumulator under the current concept label.

    The block output is returned unchanged. ``current`` is set by the caller before each prompt's run.
    """

    def __init__(self, sae, accumulator, input_space: str | None = None):
        self.sae = sae
        self.acc = accumulator
        self.input_space = input_space or getattr(sae.cfg, "input_space", "output")
        self.current: str | None = None

    def __call__(self, block_in: Tensor, block_out: Tensor, step: StepInfo) -> Tensor:
        if self.current is None:
            return block_out
        parts = chunk_rows(block_out.shape[0], step.chunks, (0,))
        if not parts:
            return block_out
        idx = torch.cat([torch.arange(p.start, p.stop) for p in parts]).to(block_out.device)
        a = block_out.index_select(0, idx)
        if self.input_space == "residual":
            a = a - block_in.index_select(0, idx)
        with torch.no_grad():
            codes = self.sae.encode(rearrange(a, "b c h w -> b h w c"))
        self.acc.add(self.current, step.timestep, codes)
        return block_out
