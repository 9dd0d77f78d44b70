"""Look-ahead masks: sample twice from the same noise, detect on the first pass, edit on the second with the
first pass's masks from the very first step.

Why: detection is reliable from the middle of sampling on, but the layout is decided in the first steps; an
edit that starts when the mask has formed is late, and the model refills the slot. Pass 1 runs the patched
model with every edit off and records the detector's masks (and scores) at every step; its masks become data,
``GuideMasks``: per image, the patches detected on at least ``votes`` of the reliable steps (those where the
concept's presence gate separates; all steps for concepts without a gate), and whether the image shows the
concept at all (the gate opened on at least ``votes`` of the reliable steps). Pass 2 edits, from step one,
the guide's patches (united with the live mask by default) of the images that show the concept, and leaves
the others bit-identical.

Cost: two samplings plus the detector on pass 1 (about 2x). The hosts run the passes: ``sample_twice`` here
for any callable (diffusers), the OUTER_SAMPLE wrapper in ComfyUI (nodes/hook.py). The same noise is the
caller's duty: the callable must seed its own generator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

COMBINE = ("union", "guide")
T = TypeVar("T")


@dataclass(frozen=True)
class LookAheadSettings:
    """votes: share of the reliable steps on which a patch (or, for presence, the gate) must fire in pass 1;
    combine: "union" - pass 2 edits the guide's patches and whatever the live detector finds in images that
    show the concept; "guide" - only the guide's patches."""

    votes: float = 0.5
    combine: str = "union"

    def __post_init__(self):
        if not 0.0 < float(self.votes) <= 1.0:
            raise ValueError(f"LookAheadSettings.votes is {self.votes}, expected a share in (0, 1]")
        if self.combine not in COMBINE:
            raise ValueError(f"LookAheadSettings.combine is {self.combine!r}, expected one of {list(COMBINE)}")


@dataclass
class GuideMasks:
    """Pass 1's verdict per image (index inside its CFG chunk): masks [H, W] bool on the CPU and presence."""

    masks: dict[int, Tensor] = field(default_factory=dict)
    present: dict[int, bool] = field(default_factory=dict)
    _on: dict = field(default_factory=dict, repr=False)

    def rows(self, images: list[int], hw: tuple[int, int], device) -> tuple[Tensor, Tensor]:
        """([R, H, W] bool, [R] bool) on ``device`` for the images of a call's rows; images pass 1 never saw get
        an empty mask and are not present (left untouched)."""
        key = (tuple(images), hw, str(device))
        hit = self._on.get(key)
        if hit is None:
            empty = torch.zeros(hw, dtype=torch.bool)
            ms = [self.masks.get(i, empty) if tuple(self.masks.get(i, empty).shape) == hw else empty for i in images]
            pr = [bool(self.present.get(i, False)) and tuple(self.masks.get(i, empty).shape) == hw for i in images]
            hit = (torch.stack(ms).to(device), torch.tensor(pr, dtype=torch.bool).to(device))
            if len(self._on) > 64:
                self._on.clear()
            self._on[key] = hit
        return hit


def guide_from_recorder(recorder, detector, settings: LookAheadSettings | None = None, label: str | None = None
                        ) -> GuideMasks:
    """GuideMasks from pass 1's Recorder (masks and scores of every step; the cond branch's when it was recorded,
    as the presence gate was learned on it and the unconditional branch fires elsewhere, else all branches
    united per image). Pass 2 edits both branches of an image at the guide's patches.

    A step counts as reliable where the detector's concepts say so (their presence gate); with the detector's
    gate off, or concepts without a gate, every step is reliable and every image present."""
    settings = settings or LookAheadSettings()
    gated = bool(detector.settings.gate)
    per_image: dict[int, dict] = {}
    records = recorder.select(label)
    if any(r.branch == "cond" for r in records):  # the cond branch decides (the gate was learned on it)
        records = [r for r in records if r.branch == "cond"]
    for r in records:
        steps = per_image.setdefault(r.image, {})
        m = r.mask()
        frac = 0.0 if r.score is None else float((r.score.float() > 0).float().mean())
        if r.score is None and gated:
            raise ValueError("guide_from_recorder: pass 1 recorded no scores; use Recorder(record_scores=True)")
        old = steps.get(r.key)
        if old is None:
            steps[r.key] = [m, frac, r.timestep]
        else:
            old[0] = old[0] | m
            old[1] = max(old[1], frac)
    guide = GuideMasks()
    for img, steps in per_image.items():
        reliable, opened = [], []
        for m, frac, ts in steps.values():
            st = detector.step(ts)
            is_gated = gated and (float(st.gate) > 0 or not st.reliable)
            if not is_gated:
                reliable.append(m)
                opened.append(True)
            elif st.reliable and float(st.gate) > 0:
                reliable.append(m)
                opened.append(frac >= float(st.gate))
        if not reliable:
            guide.masks[img] = torch.zeros_like(next(iter(steps.values()))[0])
            guide.present[img] = False
            continue
        n_open = sum(opened)
        guide.present[img] = n_open >= settings.votes * len(reliable) and n_open > 0
        votes = [m for m, o in zip(reliable, opened, strict=True) if o] or reliable
        stack = torch.stack(votes).float()
        guide.masks[img] = stack.mean(0) >= settings.votes
    logger.debug("look-ahead guide: %d image(s), present %s", len(guide.masks), guide.present)
    return guide


def sample_twice(interventions: Iterable, sample: Callable[[], T], settings: LookAheadSettings | None = None) -> T:
    """Run ``sample()`` twice with ``interventions`` (BlockInterventions already attached to the model, e.g. with
    torch_hooks.attach_interventions): pass 1 detects only, pass 2 edits with the guide built from pass 1.
    ``sample`` must start from the same noise on both calls (seed its generator inside). Returns pass 2's result;
    the interventions are back in one-pass mode afterwards, also after an error or interrupt."""
    ivs = list(interventions)
    try:
        recs = [iv.begin_detect_pass() for iv in ivs]
        sample()
        for iv, rec in zip(ivs, recs, strict=True):
            iv.begin_edit_pass(guide_from_recorder(rec, iv.detector, settings or iv.lookahead, iv.label))
        return sample()
    finally:
        for iv in ivs:
            iv.end_lookahead()
