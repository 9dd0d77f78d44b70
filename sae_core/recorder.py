"""The per-run Recorder: detection masks (bit-packed) and score maps (fp16) on the CPU, and the per-step merges
of a branch's chunks that the nodes read (Mask Preview)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import SAEInputError, SAELookupError
from .mixins import SharedOnCopy
from .steps import BRANCH_NAMES, StepInfo


def pack_mask(mask: Tensor) -> Tensor:
    """[..., H, W] bool -> [..., ceil(H*W / 8)] uint8 on the CPU (little-endian bit order)."""
    lead = mask.shape[:-2]
    flat = mask.reshape(*lead, -1).to("cpu", torch.uint8)
    pad = (-flat.shape[-1]) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(*lead, pad)], -1)
    bits = flat.reshape(*lead, -1, 8) << torch.arange(8, dtype=torch.uint8)
    return bits.sum(-1, dtype=torch.uint8)


def unpack_mask(bits: Tensor, hw: tuple[int, int]) -> Tensor:
    H, W = hw
    lead = bits.shape[:-1]
    unp = (bits[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return unp.reshape(*lead, -1)[..., : H * W].reshape(*lead, H, W).bool()


@dataclass
class MaskRecord:
    label: str
    key: int | float  # step_index, or timestep when unknown
    timestep: float
    sigma: float | None
    branch: str  # "cond" | "uncond"
    chunk: int  # position of the chunk in the batch
    image: int  # index inside the chunk
    hw: tuple[int, int]
    bits: Tensor  # packed mask, uint8
    score: Tensor | None  # [H, W] float16 or None
    all_detected: bool
    device: str = ""  # the device that computed it (several under multi-GPU sampling)

    def mask(self) -> Tensor:
        return unpack_mask(self.bits, self.hw)


@dataclass
class Recorder(SharedOnCopy):
    """Per-run store of detection masks (bit-packed) and score maps (fp16) on the CPU. Reset per run.

    Shared on copy: the patched model's clones must all write to the one recorder that Mask Preview reads.
    Thread-safe: under multi-GPU sampling each device's thread adds its chunks' records (tagged with the
    device); they land in one list, and ``masks`` unites the chunks of one step, branch and image, whichever
    device computed them.
    """

    record_scores: bool = True
    records: list[MaskRecord] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def reset(self) -> None:
        with self._lock:
            self.records.clear()

    def devices(self) -> list[str]:
        return sorted({r.device for r in self.records})

    def add(self, label: str, step: StepInfo, branch: int, chunk: int, mask: Tensor, score: Tensor | None,
            all_detected: Tensor, device: str = "") -> None:
        """mask [b, H, W] bool, score [b, H, W] or None, all_detected [b] bool for the b images of one chunk."""
        H, W = mask.shape[-2:]
        bits = pack_mask(mask)
        sc = score.detach().to("cpu", torch.float16) if (score is not None and self.record_scores) else None
        ad = all_detected.cpu().tolist()
        new = [MaskRecord(
            label, step.key, float(step.timestep), None if step.sigma is None else float(step.sigma),
            BRANCH_NAMES[branch], chunk, i, (H, W), bits[i].clone(), None if sc is None else sc[i].clone(), bool(ad[i]),
            device,
        ) for i in range(mask.shape[0])]
        with self._lock:
            self.records.extend(new)

    def select(self, label: str | None = None, branch: str | None = None, image: int | None = None) -> list[MaskRecord]:
        with self._lock:
            records = list(self.records)
        return [r for r in records if (label is None or r.label == label) and (branch is None or r.branch == branch)
                and (image is None or r.image == image)]

    def labels(self) -> list[str]:
        return sorted({r.label for r in self.records})

    def keys(self, label: str | None = None) -> list[int | float]:
        """Recorded step keys in recording order (first appearance)."""
        return list(dict.fromkeys(r.key for r in self.select(label)))

    def masks(self, branch: str = "cond", image: int = 0, label: str | None = None) -> tuple[list, Tensor]:
        """(step keys, [S, H, W] bool) in recording order; several chunks of one branch are united."""
        return self._per_step(branch, image, label, MaskRecord.mask, torch.logical_or, "masks")

    def scores(self, branch: str = "cond", image: int = 0, label: str | None = None) -> tuple[list, Tensor]:
        """(step keys, [S, H, W] float32) in recording order: the detection margin clamped at 0 (-inf where no
        latent was selected becomes 0); several chunks of one branch are merged by their maximum."""

        def margin(r: MaskRecord) -> Tensor:
            if r.score is None:
                raise SAEInputError(
                    f"no score maps were recorded for {r.label!r} (the recorder kept masks only); show 'mask' instead"
                )
            return torch.nan_to_num(r.score.float(), neginf=0.0).clamp_min(0.0)

        return self._per_step(branch, image, label, margin, torch.maximum, "score maps")

    def _per_step(self, branch: str, image: int, label: str | None, value, merge, what: str) -> tuple[list, Tensor]:
        """One map per recorded step of ``branch`` and ``image``: ``value(record)``, the step's chunks combined
        with ``merge``; (step keys in recording order, [S, H, W])."""
        recs = self.select(label, branch, image)
        if not recs:
            raise SAELookupError(
                f"Recorder: nothing recorded for branch={branch!r}, image={image}, label={label!r}; recorded labels "
                f"{self.labels()}, branches {sorted({r.branch for r in self.records})}, images "
                f"{sorted({r.image for r in self.records})}"
            )
        by_key: dict = {}
        for r in recs:
            m = value(r)
            by_key[r.key] = merge(by_key[r.key], m) if r.key in by_key else m
        shapes = {tuple(m.shape) for m in by_key.values()}
        if len(shapes) != 1:
            raise SAEInputError(f"Recorder: {what} of label {label!r} have several grid sizes {sorted(shapes)}; pick one label")
        return list(by_key), torch.stack(list(by_key.values()))

    def aggregate(self, branch: str = "cond", image: int = 0, label: str | None = None) -> Tensor:
        """[H, W] float: the fraction of recorded steps on which each patch was detected."""
        return self.masks(branch, image, label)[1].float().mean(0)

