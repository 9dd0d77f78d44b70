"""ConceptCollector: the block hook that feeds a branch's SAE codes to a ConceptStatsAccumulator (Learn Concept)."""

from __future__ import annotations

import threading

import torch
from einops import rearrange
from torch import Tensor

from .errors import SAEInputError, SAEStateError
from .mixins import SharedOnCopy
from .steps import BRANCHES, StepInfo, chunk_rows


class ConceptCollector(SharedOnCopy):
    """Learn Concept's block hook: encodes the rows of the chosen branch (cond by default, as SAeUron) and feeds
    their codes to a ConceptStatsAccumulator under ``self.concept``; returns ``block_out`` unchanged.

    Set ``collector.concept = name`` before sampling each concept's prompts, and ``collector.sample`` to an id
    per sampling run when the accumulator keeps per-image codes for the presence gate.
    Shared on copy: it holds the SAE and the accumulator that Learn Concept reads after sampling.
    """

    def __init__(self, sae, accumulator, branches: str = "cond", input_space: str | None = None, label: str = "block"):
        if branches not in BRANCHES:
            raise SAEInputError(f"ConceptCollector({label}): branches is {branches!r}, expected one of {list(BRANCHES)}")
        if int(accumulator.n_latents) != int(sae.cfg.n_latents):
            raise SAEInputError(
                f"ConceptCollector({label}): accumulator has {accumulator.n_latents} latents, SAE "
                f"{getattr(sae, 'source', '')} has {sae.cfg.n_latents}"
            )
        self.sae, self.accumulator, self.branches, self.label = sae, accumulator, BRANCHES[branches], label
        self.input_space = input_space or getattr(sae.cfg, "input_space", None) or "output"
        self.concept: str | None = None
        self.sample = None  # id of the sampling run (e.g. prompt index): per-image codes for the presence gate
        self._lock = threading.Lock()  # multi-GPU device threads add to one accumulator

    @property
    def needs_block_in(self) -> bool:
        """Hosts keep a copy of the block input only when it is read (DiT blocks modify theirs in place)."""
        return self.input_space == "residual"

    def __call__(self, block_in: Tensor | None, block_out: Tensor, step: StepInfo) -> Tensor:
        if self.concept is None:
            raise SAEStateError(f"ConceptCollector({self.label}): set .concept to the name of the prompts being sampled")
        d = int(self.sae.cfg.d_in)
        if block_out.ndim != 4 or block_out.shape[1] != d:
            raise SAEInputError(
                f"ConceptCollector({self.label}): block output has shape {tuple(block_out.shape)}, expected [B, {d}, H, W]"
            )
        if self.input_space == "residual" and (block_in is None or block_in.shape != block_out.shape):
            raise SAEInputError(f"ConceptCollector({self.label}): a residual SAE needs the block input with the output's shape")
        parts = chunk_rows(block_out.shape[0], step.chunks, self.branches)
        if not parts or block_out.numel() == 0:
            return block_out
        idx = torch.cat([torch.arange(p.start, p.stop) for p in parts]).to(block_out.device)
        a = block_out.index_select(0, idx)
        if self.input_space == "residual":
            a = a - block_in.index_select(0, idx)
        with torch.no_grad():
            codes = self.sae.encode(rearrange(a, "b c h w -> b h w c"))
        with self._lock:
            self.accumulator.add(self.concept, step.timestep, codes, sample=self.sample)
        return block_out
