"""Step identity and the CFG chunk layout: which model call this is (StepInfo), whether an intervention is active
at it (StepWindow), and which rows of the batch belong to which branch (chunk_rows and the row helpers).

One call = one block call at one denoising step. The batch is split into ``len(step.chunks)`` equal chunks, one
CFG branch each (0 = cond, 1 = uncond; any order, any count). Formulas: docs/FORMULAS.md section 9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .errors import SAEInputError, require_int, require_number

BRANCHES = {"cond": (0,), "uncond": (1,), "both": (0, 1)}
BRANCH_NAMES = {0: "cond", 1: "uncond"}


@dataclass(frozen=True)
class StepInfo:
    """One model call: model timestep (0..999 for SD/SDXL eps models), sigma, CFG chunk flags, step index."""

    timestep: float
    sigma: float | None = None
    chunks: tuple[int, ...] = (0,)
    step_index: int | None = None

    def __post_init__(self):
        require_number("StepInfo.timestep", self.timestep)
        if self.sigma is not None:
            require_number("StepInfo.sigma", self.sigma, minimum=0.0, finite=False)
        if self.step_index is not None:
            require_int("StepInfo.step_index", self.step_index)
        chunks = self.chunks
        if isinstance(chunks, (str, bytes, dict)) or not hasattr(chunks, "__iter__") or any(
                isinstance(c, bool) or not isinstance(c, int) and not (isinstance(c, Tensor) and c.numel() == 1)
                for c in chunks):
            raise SAEInputError(f"StepInfo.chunks is {chunks!r}, expected a non-empty tuple of 0 (cond) / 1 (uncond) flags")
        object.__setattr__(self, "chunks", tuple(int(c) for c in chunks))
        if not self.chunks or any(c not in (0, 1) for c in self.chunks):
            raise SAEInputError(f"StepInfo.chunks is {self.chunks}, expected a non-empty tuple of 0 (cond) / 1 (uncond) flags")

    @property
    def key(self) -> int | float:
        """Recorder key: the step index when known, else the timestep."""
        return self.step_index if self.step_index is not None else float(self.timestep)


@dataclass(frozen=True)
class StepWindow:
    """Active where every given bound holds (inclusive). Sigma bounds suit ComfyUI's percent_to_sigma."""

    timestep_min: float | None = None
    timestep_max: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None

    def contains(self, step: StepInfo) -> bool:
        t = float(step.timestep)
        if self.timestep_min is not None and t < self.timestep_min:
            return False
        if self.timestep_max is not None and t > self.timestep_max:
            return False
        if self.sigma_min is not None or self.sigma_max is not None:
            if step.sigma is None:
                raise SAEInputError("StepWindow has sigma bounds but the StepInfo has no sigma; pass sigma or use timestep bounds")
            s = float(step.sigma)
            if self.sigma_min is not None and s < self.sigma_min:
                return False
            if self.sigma_max is not None and s > self.sigma_max:
                return False
        return True


class ChunkRows(NamedTuple):
    chunk: int  # position in the batch
    flag: int  # 0 cond / 1 uncond
    start: int
    stop: int


def chunk_rows(batch: int, chunks: Sequence[int], branches: Sequence[int]) -> list[ChunkRows]:
    """Equal chunks of the batch, one per flag; the ones whose flag is in ``branches``."""
    n = len(chunks)
    if batch % n:
        raise SAEInputError(
            f"batch of {batch} rows does not split into {n} equal CFG chunks {tuple(chunks)}; the StepInfo chunks "
            "must match the rows of this call (ComfyUI cond_or_uncond)"
        )
    size = batch // n
    return [ChunkRows(i, f, i * size, (i + 1) * size) for i, f in enumerate(chunks) if f in branches]


def row_keys(parts: Sequence[ChunkRows]) -> list[tuple[int, int, int]]:
    """(branch flag, occurrence of that flag in the batch, image) of every row of ``parts``, in order."""
    seen: dict[int, int] = {}
    keys = []
    for p in parts:
        occ = seen[p.flag] = seen.get(p.flag, -1) + 1
        keys.extend((p.flag, occ, j) for j in range(p.stop - p.start))
    return keys



def row_selection(parts: Sequence[ChunkRows], batch: int) -> slice | list[int]:
    """The rows of ``parts``: a slice when contiguous (no copy), else a list of row ids."""
    ids = [i for p in parts for i in range(p.start, p.stop)]
    if ids == list(range(ids[0], ids[-1] + 1)):
        return slice(ids[0], ids[-1] + 1)
    return ids


def take_rows(x: Tensor, rows: slice | list[int]) -> Tensor:
    if isinstance(rows, slice):
        return x if rows == slice(0, x.shape[0]) else x[rows]
    return x.index_select(0, torch.tensor(rows, device=x.device))


def put_rows(block_out: Tensor, rows: slice | list[int], new_rows: Tensor) -> Tensor:
    """A new tensor: block_out with ``rows`` replaced by new_rows (cast to block_out's dtype)."""
    new_rows = new_rows.to(block_out.dtype)
    if isinstance(rows, slice) and rows == slice(0, block_out.shape[0]):
        if new_rows.stride() == block_out.stride() and new_rows.data_ptr() != block_out.data_ptr():
            return new_rows
        return torch.empty_like(block_out).copy_(new_rows)  # block_out's memory layout (steering works channels-last)
    result = block_out.clone()
    if isinstance(rows, slice):
        result[rows] = new_rows
    else:
        result.index_copy_(0, torch.tensor(rows, device=block_out.device), new_rows)
    return result
