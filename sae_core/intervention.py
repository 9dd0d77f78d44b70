"""BlockIntervention: (block input, block output, step) -> new block output; and the per-run Recorder.

One call = one UNet block call at one denoising step. The batch is split into ``len(step.chunks)``
equal chunks, one CFG branch each (0 = cond, 1 = uncond; any order, any count). Only the rows of the
configured branches are encoded, once, then detected and edited; other rows are returned untouched.
No call counting: the step comes from the caller. Several interventions chain on one block by
feeding the output of one as ``block_out`` of the next.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import asdict, dataclass, field
from typing import Mapping, NamedTuple, Sequence

import torch
from einops import rearrange
from torch import Tensor

from .detect import ConceptDetector, pick_topk
from .replace import check_mode, replace_patches
from .steer import SteerSettings, steer_picked

logger = logging.getLogger(__name__)

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
        object.__setattr__(self, "chunks", tuple(int(c) for c in self.chunks))
        if not self.chunks or any(c not in (0, 1) for c in self.chunks):
            raise ValueError(f"StepInfo.chunks is {self.chunks}, expected a non-empty tuple of 0 (cond) / 1 (uncond) flags")

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
                raise ValueError("StepWindow has sigma bounds but the StepInfo has no sigma; pass sigma or use timestep bounds")
            s = float(step.sigma)
            if self.sigma_min is not None and s < self.sigma_min:
                return False
            if self.sigma_max is not None and s > self.sigma_max:
                return False
        return True


@dataclass(frozen=True)
class ReplaceSettings:
    """PER options. mode: random | nearest | mean; seed: for random (stateless: mixed with the step key
    and the branch, so a step gives the same draw whatever ran before or beside it); target: "output" copies
    whole block-output vectors, "residual" copies only the residual update (out' = in + r[src])."""

    mode: str = "random"
    seed: int = 0
    target: str = "output"

    def __post_init__(self):
        check_mode(self.mode)
        if self.target not in ("output", "residual"):
            raise ValueError(f"ReplaceSettings.target is {self.target!r}, expected 'output' or 'residual'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> ReplaceSettings:
        return cls(**dict(d))


# ----------------------------------------------------------------------------------------------
# Recorder


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
class Recorder:
    """Per-run store of detection masks (bit-packed) and score maps (fp16) on the CPU. Reset per run.

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

    def __deepcopy__(self, memo):
        # ComfyUI deep-copies model_options on every clone; this object holds SAE weights (or the run's records),
        # which must be shared, not copied.
        return self

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
        recs = self.select(label, branch, image)
        if not recs:
            raise KeyError(
                f"Recorder: nothing recorded for branch={branch!r}, image={image}, label={label!r}; recorded labels "
                f"{self.labels()}, branches {sorted({r.branch for r in self.records})}, images "
                f"{sorted({r.image for r in self.records})}"
            )
        by_key: dict = {}
        for r in recs:
            m = r.mask()
            by_key[r.key] = by_key[r.key] | m if r.key in by_key else m
        shapes = {tuple(m.shape) for m in by_key.values()}
        if len(shapes) != 1:
            raise ValueError(f"Recorder: masks of label {label!r} have several grid sizes {sorted(shapes)}; pick one label")
        return list(by_key), torch.stack(list(by_key.values()))

    def aggregate(self, branch: str = "cond", image: int = 0, label: str | None = None) -> Tensor:
        """[H, W] float: the fraction of recorded steps on which each patch was detected."""
        return self.masks(branch, image, label)[1].float().mean(0)

    def all_detected(self) -> list[MaskRecord]:
        return [r for r in self.records if r.all_detected]


# ----------------------------------------------------------------------------------------------
# The intervention


class ChunkRows(NamedTuple):
    chunk: int  # position in the batch
    flag: int  # 0 cond / 1 uncond
    start: int
    stop: int


def chunk_rows(batch: int, chunks: Sequence[int], branches: Sequence[int]) -> list[ChunkRows]:
    """Equal chunks of the batch, one per flag; the ones whose flag is in ``branches``."""
    n = len(chunks)
    if batch % n:
        raise ValueError(
            f"batch of {batch} rows does not split into {n} equal CFG chunks {tuple(chunks)}; the StepInfo chunks "
            "must match the rows of this call (ComfyUI cond_or_uncond)"
        )
    size = batch // n
    return [ChunkRows(i, f, i * size, (i + 1) * size) for i, f in enumerate(chunks) if f in branches]


def _seed_for(seed: int, step: StepInfo, flag: int, occurrence: int) -> int:
    """A per-(step, branch) seed: the cond draw is the same whether or not an uncond chunk ran beside it."""
    key = step.step_index if step.step_index is not None else round(float(step.timestep) * 1000)
    h = hashlib.sha256(f"{int(seed)}:{key}:{flag}:{occurrence}".encode()).hexdigest()
    return int(h[:15], 16)


def _row_selection(parts: Sequence[ChunkRows], batch: int) -> slice | list[int]:
    """The rows of ``parts``: a slice when contiguous (no copy), else a list of row ids."""
    ids = [i for p in parts for i in range(p.start, p.stop)]
    if ids == list(range(ids[0], ids[-1] + 1)):
        return slice(ids[0], ids[-1] + 1)
    return ids


def _take(x: Tensor, rows: slice | list[int]) -> Tensor:
    if isinstance(rows, slice):
        return x if rows == slice(0, x.shape[0]) else x[rows]
    return x.index_select(0, torch.tensor(rows, device=x.device))


def _put(block_out: Tensor, rows: slice | list[int], new_rows: Tensor) -> Tensor:
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


def _to_host(*tensors: Tensor | None) -> list[Tensor | None]:
    """Host copies with one synchronisation: on CUDA non-blocking copies into pinned buffers, then one stream sync."""
    devs = [t for t in tensors if t is not None and t.device.type != "cpu"]
    if not devs:
        return list(tensors)
    if devs[0].device.type == "cuda":
        outs = []
        for t in tensors:
            if t is None or t.device.type == "cpu":
                outs.append(t)
                continue
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            outs.append(h)
        torch.cuda.current_stream(devs[0].device).synchronize()
        return outs
    return [None if t is None else t.cpu() for t in tensors]


class BlockIntervention:
    """Detect a concept in one block's output and optionally replace (PER) or steer it.

    sae: the SparseAutoencoder (encode_with_norm / decode / cfg / W_dec).
    detector: ConceptDetector (concepts + DetectionSettings).
    edit: ReplaceSettings (PER), SteerSettings, or None (detect and record only).
    branches: "cond", "uncond" or "both".
    window: StepWindow or None (always active).
    recorder: Recorder or None.
    label: names this intervention in records and error messages (e.g. the block name).
    input_space: override of sae.cfg.input_space ("output": SAE sees block_out; "residual": block_out - block_in).
    """

    def __init__(self, sae, detector: ConceptDetector, edit: ReplaceSettings | SteerSettings | None = None,
                 branches: str = "both", window: StepWindow | None = None, recorder: Recorder | None = None,
                 label: str = "block", input_space: str | None = None):
        if branches not in BRANCHES:
            raise ValueError(f"BlockIntervention({label}): branches is {branches!r}, expected one of {list(BRANCHES)}")
        if edit is not None and not isinstance(edit, (ReplaceSettings, SteerSettings)):
            raise TypeError(f"BlockIntervention({label}): edit is {type(edit).__name__}, expected ReplaceSettings, SteerSettings or None")
        space = input_space or getattr(sae.cfg, "input_space", None) or "output"
        if space not in ("output", "residual"):
            raise ValueError(f"BlockIntervention({label}): input_space is {space!r}, expected 'output' or 'residual'")
        if detector.n_latents != int(sae.cfg.n_latents):
            raise ValueError(
                f"BlockIntervention({label}): the detector's concepts have {detector.n_latents} latents, the SAE "
                f"{getattr(sae, 'source', '')} has {sae.cfg.n_latents}; use the SAE the concepts were learned with"
            )
        self.sae, self.detector, self.edit = sae, detector, edit
        self.branches = BRANCHES[branches]
        self.window, self.recorder, self.label, self.input_space = window, recorder, label, space
        self._lat_cache: dict = {}
        self._lock = threading.Lock()  # the latent-id cache is shared by multi-GPU device threads

    def __deepcopy__(self, memo):
        # ComfyUI deep-copies model_options on every clone; this object holds SAE weights (or the run's records),
        # which must be shared, not copied.
        return self

    @property
    def needs_block_in(self) -> bool:
        return self.input_space == "residual" or (isinstance(self.edit, ReplaceSettings) and self.edit.target == "residual")

    def _validate(self, block_in: Tensor | None, block_out: Tensor) -> None:
        d = int(self.sae.cfg.d_in)
        if block_out.ndim != 4 or block_out.shape[1] != d:
            raise ValueError(
                f"BlockIntervention({self.label}): block output has shape {tuple(block_out.shape)}, expected "
                f"[B, {d}, H, W] for SAE {getattr(self.sae, 'source', '')} (d_in = {d}); hook the block the SAE was trained on"
            )
        if self.needs_block_in and (block_in is None or block_in.shape != block_out.shape):
            raise ValueError(
                f"BlockIntervention({self.label}): needs the block input with the output's shape {tuple(block_out.shape)} "
                f"(residual SAE or residual replacement), got {None if block_in is None else tuple(block_in.shape)}"
            )

    def __call__(self, block_in: Tensor | None, block_out: Tensor, step: StepInfo) -> Tensor:
        self._validate(block_in, block_out)
        if self.window is not None and not self.window.contains(step):
            return block_out
        parts = chunk_rows(block_out.shape[0], step.chunks, self.branches)
        if not parts:
            return block_out
        rows = _row_selection(parts, block_out.shape[0])
        out_rows = _take(block_out, rows)
        in_rows = _take(block_in, rows) if self.needs_block_in else None
        a = out_rows if self.input_space == "output" else out_rows - in_rows
        tokens = rearrange(a, "b c h w -> b h w c")
        cstep = self.detector.step(step.timestep)
        sub, dense_codes, norm = self._encode(tokens, cstep, step.timestep)
        det = self.detector.detect_picked(sub, cstep)
        mask = det.mask
        res = None
        if isinstance(self.edit, SteerSettings) and cstep.latents.numel():
            res = steer_picked(self.sae, tokens, sub, dense_codes, norm, cstep, mask, self.edit,
                               self.detector.settings.threshold_scale)
        # Everything the host must see comes over in one device -> host transfer (one synchronisation per call):
        # the mask (PER draws its sources on the CPU; the recorder), the score (recorder), whether steering changed
        # anything (to return block_out itself otherwise).
        record = self.recorder is not None
        want_mask = record or isinstance(self.edit, ReplaceSettings)
        score = det.score.to(torch.float16) if record and self.recorder.record_scores else None
        host = _to_host(mask if want_mask else None, score, None if res is None else res.changed.any())
        mask_h, score_h, changed_h = host
        new_rows = None

        if isinstance(self.edit, ReplaceSettings) and bool(mask_h.any()):
            new_rows = self._replace(in_rows, out_rows, a, mask, mask_h, parts, step)
        elif res is not None and bool(changed_h):
            new_a = rearrange(res.values, "b h w c -> b c h w")
            if self.input_space == "output":
                new_rows = new_a
            else:
                new_rows = torch.where(res.changed[:, None], in_rows + new_a, out_rows)

        if record:
            all_detected = mask_h.flatten(1).all(-1)
            off = 0
            for p in parts:
                n = p.stop - p.start
                self.recorder.add(self.label, step, p.flag, p.chunk, mask_h[off:off + n],
                                  None if score_h is None else score_h[off:off + n], all_detected[off:off + n],
                                  str(block_out.device))
                off += n
        if new_rows is None:
            return block_out
        return _put(block_out, rows, new_rows)

    def _encode(self, tokens: Tensor, cstep, timestep: float):
        """(codes of the selected latents [..., K], () -> dense codes [..., M], norm state). TopK SAEs build no
        [..., M] codes unless a caller asks for them (legacy error modes); the picked values equal the dense ones."""
        sae = self.sae
        lat = self._latents_on(cstep, timestep, tokens.device)
        if getattr(sae.cfg, "is_topk", False) and hasattr(sae, "encode_topk"):
            tk = sae.encode_topk(tokens)

            def dense() -> Tensor:
                shape = (*tk.values.shape[:-1], int(sae.cfg.n_latents))
                return tk.values.new_zeros(shape).scatter_(-1, tk.indices, tk.values)

            return pick_topk(tk.values, tk.indices, lat), dense, tk.norm
        codes, norm = sae.encode_with_norm(tokens)
        return codes.index_select(-1, lat), (lambda: codes), norm

    def _latents_on(self, cstep, timestep: float, device: torch.device) -> Tensor:
        key = (float(timestep), device)
        hit = self._lat_cache.get(key)
        if hit is None or hit[0] is not cstep:
            hit = (cstep, cstep.latents.to(device))
            with self._lock:
                if len(self._lat_cache) >= 1024:
                    self._lat_cache.clear()
                self._lat_cache[key] = hit
        return hit[1]

    def _replace(self, in_rows, out_rows, a, mask, mask_h, parts, step):
        e = self.edit
        if e.target == "output":
            values = rearrange(out_rows, "b c h w -> b h w c")
        else:
            values = rearrange(a if self.input_space == "residual" else out_rows - in_rows, "b c h w -> b h w c")
        pieces, flags = [], []
        off = 0
        changed = False
        seen: dict[int, int] = {}
        for p in parts:
            n = p.stop - p.start
            occ = seen[p.flag] = seen.get(p.flag, -1) + 1
            gen = torch.Generator().manual_seed(_seed_for(e.seed, step, p.flag, occ))
            piece = values[off:off + n]
            # the mask on the host: PER's draws and index lists need no device synchronisation
            r = replace_patches(piece, mask_h[off:off + n], e.mode, gen)
            changed = changed or r.values is not piece
            pieces.append(r.values)
            flags.append(r.all_detected)
            off += n
        if not changed:  # every detected map was detected everywhere: nothing to copy from
            return None
        new_vals = rearrange(pieces[0] if len(pieces) == 1 else torch.cat(pieces), "b h w c -> b c h w")
        if e.target == "output":
            return new_vals
        # fully detected maps stay exactly as they were: in + (out - in) need not round to out
        all_detected = torch.cat(flags)
        edited = mask & ~all_detected.to(mask.device, non_blocking=True)[:, None, None]
        return torch.where(edited[:, None], in_rows + new_vals, out_rows)


class ConceptCollector:
    """Learn Concept's block hook: encodes the rows of the chosen branch (cond by default, as SAeUron) and feeds
    their codes to a ConceptStatsAccumulator under ``self.concept``; returns ``block_out`` unchanged.

    Set ``collector.concept = name`` before sampling each concept's prompts.
    """

    def __init__(self, sae, accumulator, branches: str = "cond", input_space: str | None = None, label: str = "block"):
        if branches not in BRANCHES:
            raise ValueError(f"ConceptCollector({label}): branches is {branches!r}, expected one of {list(BRANCHES)}")
        if int(accumulator.n_latents) != int(sae.cfg.n_latents):
            raise ValueError(
                f"ConceptCollector({label}): accumulator has {accumulator.n_latents} latents, SAE "
                f"{getattr(sae, 'source', '')} has {sae.cfg.n_latents}"
            )
        self.sae, self.accumulator, self.branches, self.label = sae, accumulator, BRANCHES[branches], label
        self.input_space = input_space or getattr(sae.cfg, "input_space", None) or "output"
        self.concept: str | None = None
        self._lock = threading.Lock()  # multi-GPU device threads add to one accumulator

    def __deepcopy__(self, memo):
        # ComfyUI deep-copies model_options on every clone; this object holds SAE weights (or the run's records),
        # which must be shared, not copied.
        return self

    def __call__(self, block_in: Tensor | None, block_out: Tensor, step: StepInfo) -> Tensor:
        if self.concept is None:
            raise RuntimeError(f"ConceptCollector({self.label}): set .concept to the name of the prompts being sampled")
        d = int(self.sae.cfg.d_in)
        if block_out.ndim != 4 or block_out.shape[1] != d:
            raise ValueError(
                f"ConceptCollector({self.label}): block output has shape {tuple(block_out.shape)}, expected [B, {d}, H, W]"
            )
        if self.input_space == "residual" and (block_in is None or block_in.shape != block_out.shape):
            raise ValueError(f"ConceptCollector({self.label}): a residual SAE needs the block input with the output's shape")
        parts = chunk_rows(block_out.shape[0], step.chunks, self.branches)
        if not parts:
            return block_out
        idx = torch.cat([torch.arange(p.start, p.stop) for p in parts]).to(block_out.device)
        a = block_out.index_select(0, idx)
        if self.input_space == "residual":
            a = a - block_in.index_select(0, idx)
        with torch.no_grad():
            codes = self.sae.encode(rearrange(a, "b c h w -> b h w c"))
        with self._lock:
            self.accumulator.add(self.concept, step.timestep, codes)
        return block_out
