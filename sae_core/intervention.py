"""BlockIntervention: (block input, block output, step) -> new block output, and ReplaceSettings (PER options).

Only the rows of the configured CFG branches (sae_core.steps) are encoded, once, then detected and edited; other
rows are returned untouched. No call counting: the step comes from the caller. Several interventions chain on one
block by feeding the output of one as ``block_out`` of the next. Detections go to a Recorder (sae_core.recorder).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .detect import ConceptDetector, detected_fraction
from .errors import SAEInputError, SAETypeError, require_int
from .lookahead import GuideMasks, LookAheadSettings
from .mixins import DictRoundTrip, SharedOnCopy
from .recorder import Recorder
from .replace import VALUE_MODES, check_mode, patch_salience, replace_patches
from .sae import NormState, TopKCodes
from .steer import SteerCodes, SteerSettings, steer_codes
from .steps import (
    BRANCHES,
    ChunkRows,
    StepInfo,
    StepWindow,
    chunk_rows,
    put_rows,
    row_keys,
    row_selection,
    take_rows,
)

# the public API (README, docs) imports these from here
__all__ = ["BlockIntervention", "Recorder", "ReplaceSettings", "StepInfo", "StepWindow"]

logger = logging.getLogger(__name__)

KEPT_DENSE = 64  # codes per patch that patch salience reads from an SAE without TopK
REGION_MODES = ("intersect", "replace")
FILL_VALUES = ("first_pass", "current")  # ReplaceSettings.fill_values
KEEP_REST = ("all", "objects", "off")  # ReplaceSettings.keep_rest
HOLES = ("object", "cells")  # ReplaceSettings.hole


@dataclass(frozen=True)
class ReplaceSettings(DictRoundTrip):
    """PER options. mode: random | nearest | mean; seed: for random (stateless: mixed with the step key
    and the branch, so a step gives the same draw whatever ran before or beside it); target: "output" copies
    whole block-output vectors, "residual" copies only the residual update (out' = in + r[src]); denoised: also
    copy the cells pass 2 edits (the look-ahead guide's, and the live detector's from the step they are edited) of
    the sampler's denoised prediction from background cells at every step (``sae_core.denoised``; needs look-ahead
    and a host that passes the prediction); fill_values: what the denoised fill copies into those cells, from the
    source cells it picks on pass 1's picture. "first_pass" (default): pass 1's final values there, the picture
    as it would have come out; "current": pass 2's prediction at each step there (the fill before first_pass
    became the default, kept to reproduce earlier numbers). first_pass is the default because pass 2 may draw the
    object onto a source cell, and with "current" every row of the hole then copies it across as a bar. keep_rest
    (with denoised): what keeps pass 1's prediction of the same model call, the unedited sampling's: "all" (default)
    every pixel outside the cells the fill empties, so only the hole changes; "objects" the cells where pass 1's
    picture showed another object; "off" nothing (the model may redraw around the hole, as before keep_rest). hole
    (with denoised): which pixels of the cells to fill are emptied: "object" (default) the detected cells before
    padding and, in the padding, only the pixels that hold the detected object in pass 1's picture
    (``sae_core.denoised.object_pixels``: connected to the core's object pixels, like them rather than the
    background), so a neighbour inside the padding keeps pass 1's pixels; "cells" every pixel of the cells (the fill
    before this option)."""

    mode: str = "random"
    seed: int = 0
    target: str = "output"
    denoised: bool = False
    fill_values: str = "first_pass"
    keep_rest: str = "all"
    hole: str = "object"

    def __post_init__(self):
        if not isinstance(self.mode, str):
            raise SAEInputError(f"ReplaceSettings.mode is {self.mode!r}, expected one of random, nearest, mean")
        check_mode(self.mode)
        require_int("ReplaceSettings.seed", self.seed)
        if not isinstance(self.target, str) or self.target not in ("output", "residual"):
            raise SAEInputError(f"ReplaceSettings.target is {self.target!r}, expected 'output' or 'residual'")
        if not isinstance(self.denoised, bool):
            raise SAEInputError(f"ReplaceSettings.denoised is {self.denoised!r}, expected true or false")
        if not isinstance(self.fill_values, str) or self.fill_values not in FILL_VALUES:
            raise SAEInputError(f"ReplaceSettings.fill_values is {self.fill_values!r}, expected one of "
                                f"{list(FILL_VALUES)}")
        if not isinstance(self.keep_rest, str) or self.keep_rest not in KEEP_REST:
            raise SAEInputError(f"ReplaceSettings.keep_rest is {self.keep_rest!r}, expected one of {list(KEEP_REST)}")
        if not isinstance(self.hole, str) or self.hole not in HOLES:
            raise SAEInputError(f"ReplaceSettings.hole is {self.hole!r}, expected one of {list(HOLES)}")




def _deciding_rows(keys: list[tuple[int, int, int]], branches: Sequence[int]) -> Tensor:
    """[R] bool: the rows whose detections may open the presence gate: cond rows, or every row of an
    intervention that sees no cond rows (branches = uncond)."""
    if 0 not in branches:
        return torch.ones(len(keys), dtype=torch.bool)
    return torch.tensor([f == 0 for f, _, _ in keys], dtype=torch.bool)


def _seed_for(seed: int, step: StepInfo, flag: int, occurrence: int) -> int:
    """A per-(step, branch) seed: the cond draw is the same whether or not an uncond chunk ran beside it."""
    key = step.step_index if step.step_index is not None else round(float(step.timestep) * 1000)
    h = hashlib.sha256(f"{int(seed)}:{key}:{flag}:{occurrence}".encode()).hexdigest()
    return int(h[:15], 16)



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


class Encoded(NamedTuple):
    """One call's SAE codes of the selected rows. TopK SAEs keep (values, indices) and build no [..., M] codes
    unless a caller asks for them (legacy error modes); the picked values equal the dense ones."""

    codes: TopKCodes | Tensor  # TopKCodes, or dense codes [..., M] for SAEs without TopK
    norm: NormState | None
    n_latents: int

    def dense(self) -> Tensor:
        """[..., M] codes."""
        if not isinstance(self.codes, TopKCodes):
            return self.codes
        tk = self.codes
        return tk.values.new_zeros((*tk.values.shape[:-1], self.n_latents)).scatter_(-1, tk.indices, tk.values)

    def kept(self) -> tuple[Tensor, Tensor]:
        """(values, indices) [..., k] of the largest codes per patch, as patch salience reads them."""
        if isinstance(self.codes, TopKCodes):
            return self.codes.values, self.codes.indices
        return self.codes.topk(min(KEPT_DENSE, self.codes.shape[-1]), dim=-1)


class BlockIntervention(SharedOnCopy):
    """Detect a concept in one block's output and optionally replace (PER) or steer it.

    sae: the SparseAutoencoder (encode_with_norm / decode / cfg / W_dec).
    detector: ConceptDetector (concepts + DetectionSettings).
    edit: ReplaceSettings (PER), SteerSettings, or None (detect and record only).
    branches: "cond", "uncond" or "both".
    window: StepWindow or None (always active).
    recorder: Recorder or None.
    label: names this intervention in records and error messages (e.g. the block name).
    input_space: override of sae.cfg.input_space ("output": SAE sees block_out; "residual": block_out - block_in).
    region: an optional user-drawn mask [N, H_img, W_img] (or [H_img, W_img]) in 0..1 at any resolution; it is
        resized to the block's grid (a patch is inside where at least half of it is painted) and either replaces
        the detector's mask (region_mode "replace") or restricts it (region_mode "intersect"). N is 1 (every
        image) or the number of images per CFG branch.
    lookahead: LookAheadSettings when the host samples twice (see sae_core.lookahead); None = one pass.

    Per-run memory (the presence gate's verdict per image, sticky masks) is cleared by ``reset()``, which the
    hosts call at the start of every run (torch_hooks.attach_interventions, the ComfyUI sampler wrapper).
    Shared on copy: it holds the SAE (whose weights must not be duplicated per clone) and the recorder.
    """

    def __init__(self, sae, detector: ConceptDetector, edit: ReplaceSettings | SteerSettings | None = None,
                 branches: str = "both", window: StepWindow | None = None, recorder: Recorder | None = None,
                 label: str = "block", input_space: str | None = None, region: Tensor | None = None,
                 region_mode: str = "intersect", lookahead: LookAheadSettings | None = None):
        if branches not in BRANCHES:
            raise SAEInputError(f"BlockIntervention({label}): branches is {branches!r}, expected one of {list(BRANCHES)}")
        if edit is not None and not isinstance(edit, (ReplaceSettings, SteerSettings)):
            raise SAETypeError(f"BlockIntervention({label}): edit is {type(edit).__name__}, expected ReplaceSettings, SteerSettings or None")
        space = input_space or getattr(sae.cfg, "input_space", None) or "output"
        if space not in ("output", "residual"):
            raise SAEInputError(f"BlockIntervention({label}): input_space is {space!r}, expected 'output' or 'residual'")
        if detector.n_latents != int(sae.cfg.n_latents):
            raise SAEInputError(
                f"BlockIntervention({label}): the detector's concepts have {detector.n_latents} latents, the SAE "
                f"{getattr(sae, 'source', '')} has {sae.cfg.n_latents}; use the SAE the concepts were learned with"
            )
        if region_mode not in REGION_MODES:
            raise SAEInputError(f"BlockIntervention({label}): region_mode is {region_mode!r}, expected one of {list(REGION_MODES)}")
        if region is not None:
            if not isinstance(region, Tensor) or region.ndim not in (2, 3) or region.numel() == 0:
                raise SAEInputError(
                    f"BlockIntervention({label}): region should be a mask [N, H, W] or [H, W] (a ComfyUI MASK), found "
                    f"{tuple(region.shape) if isinstance(region, Tensor) else type(region).__name__}"
                )
            if not bool(torch.isfinite(region.float()).all()):
                raise SAEInputError(f"BlockIntervention({label}): region holds NaN/inf values, expected 0..1")
            region = region.detach().float()
            region = region[None] if region.ndim == 2 else region
        self.region, self.region_mode = region, region_mode
        self._region_cache: dict = {}
        self.sae, self.detector, self.edit = sae, detector, edit
        self.branches = BRANCHES[branches]
        self.window, self.recorder, self.label, self.input_space = window, recorder, label, space
        if lookahead is not None and not isinstance(lookahead, LookAheadSettings):
            raise TypeError(f"BlockIntervention({label}): lookahead is {type(lookahead).__name__}, expected "
                            "LookAheadSettings or None")
        self.lookahead = lookahead
        if isinstance(edit, ReplaceSettings) and edit.denoised and lookahead is None:
            raise SAEInputError(
                f"BlockIntervention({label}): ReplaceSettings.denoised fills the look-ahead guide's cells, but "
                "lookahead is None; pass LookAheadSettings() or set denoised=False")
        self.phase = "single"  # "detect": look-ahead pass 1 (record only); "edit": pass 2 with self.guide
        self.guide: GuideMasks | None = None
        self.pass_recorder: Recorder | None = None
        self.fill_memory: dict = {}  # sae_core.denoised: pass 1's last prediction and the sources drawn from it
        self._memory: dict = {}
        self._warned_nonfinite = False

    def reset(self) -> None:
        """Forget the previous run (gate verdicts, sticky masks). Hosts call it when a run starts."""
        self._memory = {}

    # -- look-ahead (two passes from the same noise; the host runs them, see sae_core.lookahead) --------------

    def begin_detect_pass(self) -> Recorder:
        """Pass 1: detect and record on every step, edit nothing, no gate; returns the pass's recorder."""
        self.reset()
        self.phase, self.guide, self.fill_memory = "detect", None, {}
        self.pass_recorder = Recorder(record_scores=True)
        return self.pass_recorder

    def begin_edit_pass(self, guide: GuideMasks) -> None:
        """Pass 2: edit with the masks of pass 1 (``guide``) from the first step on."""
        self.reset()
        self.phase, self.guide, self.pass_recorder = "edit", guide, None

    def end_lookahead(self) -> None:
        self.reset()
        self.phase, self.guide, self.pass_recorder, self.fill_memory = "single", None, None, {}

    @property
    def needs_block_in(self) -> bool:
        return self.input_space == "residual" or (isinstance(self.edit, ReplaceSettings) and self.edit.target == "residual")

    def _validate(self, block_in: Tensor | None, block_out: Tensor) -> None:
        d = int(self.sae.cfg.d_in)
        if block_out.ndim != 4 or block_out.shape[1] != d:
            raise SAEInputError(
                f"BlockIntervention({self.label}): block output has shape {tuple(block_out.shape)}, expected "
                f"[B, {d}, H, W] for SAE {getattr(self.sae, 'source', '')} (d_in = {d}); hook the block the SAE was trained on"
            )
        if self.needs_block_in and (block_in is None or block_in.shape != block_out.shape):
            raise SAEInputError(
                f"BlockIntervention({self.label}): needs the block input with the output's shape {tuple(block_out.shape)} "
                f"(residual SAE or residual replacement), got {None if block_in is None else tuple(block_in.shape)}"
            )

    def __call__(self, block_in: Tensor | None, block_out: Tensor, step: StepInfo) -> Tensor:
        self._validate(block_in, block_out)
        if block_out.numel() == 0:  # an empty batch (or grid): nothing to detect or edit
            return block_out
        if self.window is not None and not self.window.contains(step):
            return block_out
        parts = chunk_rows(block_out.shape[0], step.chunks, self.branches)
        if not parts:
            return block_out
        rows = row_selection(parts, block_out.shape[0])
        out_rows = take_rows(block_out, rows)
        in_rows = take_rows(block_in, rows) if self.needs_block_in else None
        a = out_rows if self.input_space == "output" else out_rows - in_rows
        tokens = rearrange(a, "b c h w -> b h w c")
        enc = self._encode(tokens)
        found = self.detector.detect_codes(enc.codes, step.timestep)
        cstep, det = found.step, found.detection
        mask = self._effective_mask(det, found.picked, cstep, parts, step)
        if self.region is not None:
            user = self._region_rows(parts, mask.shape[1:], mask.device)
            mask = user if self.region_mode == "replace" else mask & user
        edit = None if self.phase == "detect" else self.edit
        recorder = self.pass_recorder if self.phase == "detect" else self.recorder
        res = None
        if isinstance(edit, SteerSettings) and cstep.latents.numel():
            sign = None
            if edit.cfg_sign == "opposite" and edit.method in ("unbox_add", "gsae_add"):
                sign = torch.cat([torch.full((p.stop - p.start,), -1.0 if p.flag == 1 else 1.0) for p in parts])
            res = steer_codes(self.sae, tokens, SteerCodes(found.picked, enc.norm, enc.dense), cstep, mask, edit,
                              self.detector.settings, row_sign=sign)
        # Everything the host must see comes over in one device -> host transfer (one synchronisation per call):
        # the mask (PER draws its sources on the CPU; the recorder), the score (recorder), whether steering changed
        # anything (to return block_out itself otherwise).
        record = recorder is not None
        want_mask = record or isinstance(edit, ReplaceSettings)
        score = det.score.to(torch.float16) if record and recorder.record_scores else None
        nonfinite = None if self._warned_nonfinite else ~torch.isfinite(tokens).all()
        host = _to_host(mask if want_mask else None, score, None if res is None else res.changed.any(), nonfinite)
        mask_h, score_h, changed_h, nonfinite_h = host
        if nonfinite_h is not None and bool(nonfinite_h):
            self._warned_nonfinite = True  # once per intervention: a diverging sampler emits them at every step
            logger.warning(
                "%s: the block emits NaN/inf activations at timestep %.1f; those patches are never detected and never "
                "copied into others (PER skips them as sources). The model or its precision diverged: try fp32/bf16 "
                "or another sampler", self.label, float(step.timestep),
            )
        new_rows = None

        if isinstance(self.edit, ReplaceSettings) and self.edit.denoised:
            if self.phase == "detect":
                self._keep_salience(enc, parts)
            elif self.phase == "edit":
                self._keep_edited(mask_h, parts)
        if isinstance(edit, ReplaceSettings) and bool(mask_h.any()):
            new_rows = self._replace(in_rows, out_rows, a, mask, mask_h, parts, step, enc.kept)
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
                recorder.add(self.label, step, p.flag, p.chunk, mask_h[off:off + n],
                             None if score_h is None else score_h[off:off + n], all_detected[off:off + n],
                             str(block_out.device))
                off += n
        if new_rows is None:
            return block_out
        return put_rows(block_out, rows, new_rows)

    def _effective_mask(self, det, picked: Tensor, cstep, parts: Sequence[ChunkRows], step: StepInfo) -> Tensor:
        """The mask the edit uses: the detector's, through the look-ahead guide or the presence gate and the
        temporal rule. Stays on the device (no synchronisation).

        With the gate (or a guide) the cond branch decides: the gate was learned on cond rows (the prompt names the
        concept there; the unconditional branch fires elsewhere), so presence opens on cond rows only and the
        uncond row of an image is edited at its cond row's patches (the same call's, else the last one seen)."""
        mask = det.mask
        if self.phase == "detect":
            return mask
        keys = row_keys(parts)
        if self.phase == "edit" and self.guide is not None:
            g_mask, g_present = self.guide.rows([j for _, _, j in keys], tuple(mask.shape[-2:]), mask.device)
            base = (g_mask | self._cond_masks(mask, keys)) if self.lookahead is None or self.lookahead.combine == "union" \
                else g_mask
            return base & g_present[:, None, None]
        s = self.detector.settings
        # a gated concept: gate > 0 at steps where it separates, 0 and not reliable elsewhere (never opens there);
        # gate 0 and reliable = a concept without a gate (older file, typed latents): not gated
        if s.gate and (float(cstep.gate) > 0 or not cstep.reliable):
            deciders = _deciding_rows(keys, self.branches)
            if cstep.reliable and cstep.latents.numel():
                if float(s.threshold_scale) == 1.0:  # the detector's own score is the gate's statistic: no second pass
                    frac = (det.score > 0).flatten(1).float().mean(-1)
                else:
                    frac = detected_fraction(picked, cstep.thresholds.to(picked.device))
                opened = frac >= float(cstep.gate)
                opened = opened & deciders.to(opened.device)
            else:
                opened = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
            images = [(o, j) for _, o, j in keys]
            per_image = {k: torch.zeros((), dtype=torch.bool, device=opened.device) for k in images}
            for r, k in enumerate(images):  # both rows of an image see the verdict of its cond row
                per_image[k] = per_image[k] | opened[r]
            present = self._remember("present", images, torch.stack([per_image[k] for k in images]), torch.logical_or)
            mask = self._cond_masks(mask, keys) & present[:, None, None]
        if s.temporal == "sticky":
            mask = self._remember("sticky", keys, mask, torch.logical_or)
        return mask

    def _cond_masks(self, mask: Tensor, keys: list[tuple[int, int, int]]) -> Tensor:
        """Each uncond row takes the mask of its image's cond row: from this call, else the last one remembered;
        rows of an intervention on the uncond branch alone keep their own."""
        if 0 not in self.branches:
            return mask
        mem = self._memory.setdefault("cond_mask", {})
        cond_row = {(o, j): r for r, (f, o, j) in enumerate(keys) if f == 0}
        for r, (f, o, j) in enumerate(keys):
            if f == 0:
                mem[(o, j)] = mask[r]
        src = [r if f == 0 else cond_row.get((o, j), -1) for r, (f, o, j) in enumerate(keys)]
        if all(i >= 0 for i in src):
            return mask if src == list(range(len(keys))) else mask[torch.tensor(src, device=mask.device)]
        rows = []
        for r, (_f, o, j) in enumerate(keys):
            m = mask[src[r]] if src[r] >= 0 else mem.get((o, j))
            rows.append(mask[r] if m is None or m.shape != mask[r].shape else m)
        return torch.stack(rows)

    def _remember(self, what: str, keys: list[tuple], new: Tensor, combine) -> Tensor:
        """Combine ``new`` (rows in ``keys`` order) with what this run remembered for the same rows, store and
        return the result. Rows are identified by (branch, occurrence of the branch, image)."""
        mem = self._memory.setdefault(what, {})
        rows = []
        for r, key in enumerate(keys):
            old = mem.get(key)
            cur = new[r] if old is None or old.shape != new[r].shape or old.device != new.device else combine(old, new[r])
            mem[key] = cur
            rows.append(cur)
        return torch.stack(rows)
    def _region_rows(self, parts, hw: tuple[int, int], device) -> Tensor:
        """The user's region on the block's grid for the rows of ``parts``: [rows, H, W] bool."""
        H, W = int(hw[0]), int(hw[1])
        key = (H, W, device)
        grid = self._region_cache.get(key)
        if grid is None:
            # area average: a patch is inside where at least half of its pixels are painted
            grid = F.interpolate(self.region[:, None], size=(H, W), mode="area")[:, 0] >= 0.5
            grid = self._region_cache[key] = grid.to(device)
        n = grid.shape[0]
        rows = []
        for p in parts:
            size = p.stop - p.start
            if n not in (1, size):
                raise SAEInputError(
                    f"BlockIntervention({self.label}): the region mask has {n} images, expected 1 or {size} (one per "
                    "image of the batch); give one mask, or one per image"
                )
            rows.append(grid.expand(size, H, W) if n == 1 else grid)
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    def _encode(self, tokens: Tensor) -> Encoded:
        sae = self.sae
        if getattr(sae.cfg, "is_topk", False) and hasattr(sae, "encode_topk"):
            tk = sae.encode_topk(tokens)
            return Encoded(tk, tk.norm, int(sae.cfg.n_latents))
        codes, norm = sae.encode_with_norm(tokens)
        return Encoded(codes, norm, int(sae.cfg.n_latents))

    def _keep_salience(self, enc: Encoded, parts: Sequence[ChunkRows]) -> None:
        """Look-ahead pass 1 with the denoised fill: which call's codes hold each image's latest step, the cond row
        preferred (a reference only: the salience is computed once, by ``fill_salience``, when pass 2 needs it)."""
        codes = self.fill_memory.setdefault("codes", {})
        for r, (flag, _, j) in enumerate(row_keys(parts)):
            if flag == 0 or codes.get(j, (None, None, 1))[2] != 0:
                codes[j] = (enc, r, flag)
        self.fill_memory.pop("salience", None)

    def _keep_edited(self, mask_h: Tensor, parts: Sequence[ChunkRows]) -> None:
        """Look-ahead pass 2 with the denoised fill: the patches edited so far, per image (both branches; a patch
        once edited stays), so the fill also covers what the live detector adds to the guide (``fill_edited``)."""
        edited = self.fill_memory.setdefault("edited", {})
        for r, (_, _, j) in enumerate(row_keys(parts)):
            old = edited.get(j)
            if old is None or old.shape != mask_h[r].shape:
                edited[j] = mask_h[r].clone()
            elif bool(mask_h[r].le(old).all()):
                continue
            else:
                edited[j] = old | mask_h[r]
            # the fill draws its sources again only when this changes
            self.fill_memory["edited_version"] = self.fill_memory.get("edited_version", 0) + 1

    def fill_edited(self) -> dict[int, Tensor]:
        """{image: [H, W] bool on the host}: every patch pass 2 has edited so far (the guide's and the live
        detector's), sticky."""
        return self.fill_memory.get("edited", {})

    def fill_salience(self) -> dict[int, Tensor]:
        """{image: [H, W] patch salience on the host} at the last step pass 1 saw (``sae_core.denoised``'s sources
        avoid every object); computed once per pass."""
        memo = self.fill_memory.get("salience")
        if memo is None:
            memo, per_call = {}, {}
            n = int(self.sae.cfg.n_latents)
            for j, (enc, r, _) in self.fill_memory.get("codes", {}).items():
                if id(enc) not in per_call:
                    kv, ki = enc.kept()
                    per_call[id(enc)] = patch_salience(kv, ki, n).cpu()
                memo[j] = per_call[id(enc)][r]
            self.fill_memory["salience"] = memo
        return memo

    def _replace(self, in_rows, out_rows, a, mask, mask_h, parts, step, kept):
        e = self.edit
        salience = None
        if e.mode in VALUE_MODES:
            kv, ki = kept()
            salience = patch_salience(kv, ki, int(self.sae.cfg.n_latents))
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
            r = replace_patches(piece, mask_h[off:off + n], e.mode, gen,
                                None if salience is None else salience[off:off + n])
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

