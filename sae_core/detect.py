"""Detection: SAE codes + concept latents at step t -> per-patch score map and binary mask.

Score (documented choice): score(p) = max_{i in S_t} (f_i(p) - scale * tau_i(t)), a margin in code
units. A patch is detected where score > 0, i.e. some selected latent fires above its scaled
threshold (SAeUron's own touch rule when scale = 1). A margin rather than a ratio f_i / tau_i keeps
thresholds of 0 (typed latents, fixed threshold 0) well defined. With no selected latent the score
is -inf everywhere and nothing is detected.

Then, in this order: patches where the concept's latents carry too small a share of the code are dropped
(``min_share``; with concepts to keep, a share below one of theirs, see ``ConceptDetector``), regions smaller than
``min_region`` patches (8-connected) are dropped, and the mask is dilated by ``padding`` patches with a
(2p+1) x (2p+1) square.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .concepts import ConceptDictionary, ConceptStep
from .errors import SAEInputError, require_int, require_number
from .mixins import DictRoundTrip
from .sae import TopKCodes

logger = logging.getLogger(__name__)


TEMPORAL_MODES = ("none", "sticky")


@dataclass(frozen=True)
class DetectionSettings(DictRoundTrip):
    """How codes become a mask.

    threshold_scale: a patch is detected where f_i > threshold_scale * tau_i(t) for a selected i;
        larger -> fewer patches, 0 -> every patch where a selected latent is active at all.
    padding: dilate the mask by this many patches (square neighbourhood); 0 = no dilation.
    min_region: drop 8-connected detected regions with fewer patches than this (before padding);
        0 or 1 keeps everything.
    gate: apply the concept's presence gate (learned with the concept, see sae_core.gate): an image is edited
        only once the share of its patches detected at a reliable step reaches the learned fraction, and from
        then on for the rest of the run; images without the concept stay bit-identical. Concepts without a
        gate (older files, typed latents) are not gated.
    temporal: "none" - each step's mask alone; "sticky" - a patch once detected stays detected for the rest
        of the run (a retreating concept cannot come back at the edge of a shrinking mask).
    min_share: a patch is detected only where the selected latents above threshold carry at least this share of
        the patch's whole code (sum of their codes / sum of all its codes); 0 = off. Neighbouring concepts share
        latents (a purple concept's latents also fire, weaker, on blue objects, whose code the blue latents
        dominate): the share keeps the patches the concept explains. Applied before min_region and padding;
        the presence gate's statistic is unchanged.
    """

    threshold_scale: float = 1.0
    padding: int = 0
    min_region: int = 0
    gate: bool = False
    temporal: str = "none"
    min_share: float = 0.0

    def __post_init__(self):
        require_number("DetectionSettings.threshold_scale", self.threshold_scale, minimum=0.0)
        require_int("DetectionSettings.padding", self.padding, minimum=0)
        require_int("DetectionSettings.min_region", self.min_region, minimum=0)
        if not isinstance(self.gate, bool):
            raise SAEInputError(f"DetectionSettings.gate is {self.gate!r}, expected true or false")
        if self.temporal not in TEMPORAL_MODES:
            raise SAEInputError(f"DetectionSettings.temporal is {self.temporal!r}, expected one of {list(TEMPORAL_MODES)}")
        share = require_number("DetectionSettings.min_share", self.min_share, minimum=0.0)
        if share > 1.0:
            raise SAEInputError(f"DetectionSettings.min_share is {self.min_share}, expected a share in [0, 1] (0 = off)")


class Detection(NamedTuple):
    score: Tensor  # [B, H, W] float32 margin max_i (f_i - scale * tau_i); detected before post-processing where > 0
    mask: Tensor  # [B, H, W] bool, after min_region and padding


class StepDetection(NamedTuple):
    """One block call's detection (``ConceptDetector.detect_codes``)."""

    step: ConceptStep  # the concepts' selected latents at the call's timestep
    picked: Tensor  # [B, H, W, K] codes of step.latents
    detection: Detection


def _check_grid(codes: Tensor, what: str) -> None:
    if codes.ndim != 4:
        raise SAEInputError(
            f"{what}: codes have shape {tuple(codes.shape)}, expected [B, H, W, M]; reshape token codes "
            "[B, H*W, M] with the block's H and W first"
        )


def score_map(codes: Tensor, latents: Tensor, thresholds: Tensor, scale: float = 1.0) -> Tensor:
    """codes [B, H, W, M], latents [K], thresholds [K] -> [B, H, W] float32 max_i (f_i - scale * tau_i)."""
    _check_grid(codes, "score_map")
    return score_from_picked(codes.index_select(-1, latents.to(codes.device)), thresholds, scale)


def score_from_picked(picked: Tensor, thresholds: Tensor, scale: float = 1.0) -> Tensor:
    """picked [B, H, W, K] = the codes of the K selected latents -> [B, H, W] float32 max_i (f_i - scale * tau_i)."""
    if picked.shape[-1] == 0:
        return torch.full(picked.shape[:3], float("-inf"), device=picked.device, dtype=torch.float32)
    return (picked.float() - float(scale) * thresholds.to(picked.device, torch.float32)).amax(-1)


def pick_topk(values: Tensor, indices: Tensor, latents: Tensor) -> Tensor:
    """The dense codes' columns ``latents`` [K] from TopK codes (values, indices [..., k]) -> [..., K].

    Equals ``zeros(M).scatter(indices, values)[..., latents]`` exactly: each output is one kept value plus zeros
    (the indices of a row are distinct), or 0 where the latent was not kept. No [..., M] tensor is built.
    """
    lat = latents.to(indices.device)
    hit = indices.unsqueeze(-1) == lat  # [..., k, K]
    return torch.where(hit, values.unsqueeze(-1), values.new_zeros(())).sum(-2)


def detected_fraction(picked: Tensor, thresholds: Tensor) -> Tensor:
    """picked [B, H, W, K] -> [B] float32 share of patches where some selected latent exceeds its threshold
    (scale 1): the presence gate's statistic, the same at learning and at detection time."""
    if picked.shape[-1] == 0:
        return torch.zeros(picked.shape[0], device=picked.device)
    return (score_from_picked(picked, thresholds, 1.0) > 0).flatten(1).float().mean(-1)


def dilate_mask(mask: Tensor, padding: int) -> Tensor:
    """[B, H, W] bool dilated by ``padding`` patches with a (2p+1)^2 square (edges not wrapped)."""
    if padding <= 0:
        return mask
    m = mask.float()[:, None]
    return F.max_pool2d(m, kernel_size=2 * padding + 1, stride=1, padding=padding)[:, 0] > 0


def label_regions(mask: Tensor) -> Tensor:
    """8-connected components of [B, H, W] bool -> int64 labels (0 = background, else a region id).

    Max-label propagation with 3x3 max pooling; converges within the longest path length, which is
    small on feature-map grids (<= 128 x 128).
    """
    B, H, W = mask.shape
    ids = torch.arange(1, H * W + 1, device=mask.device, dtype=torch.float32).view(1, H, W).expand(B, H, W)
    lab = torch.where(mask, ids, torch.zeros((), device=mask.device))
    while True:
        grown = F.max_pool2d(lab[:, None], 3, stride=1, padding=1)[:, 0] * mask
        if torch.equal(grown, lab):
            return lab.long()
        lab = grown


def drop_small_regions(mask: Tensor, min_size: int) -> Tensor:
    """Remove 8-connected regions with fewer than ``min_size`` patches from [B, H, W] bool."""
    if min_size <= 1 or not bool(mask.any()):
        return mask
    lab = label_regions(mask)
    B, H, W = mask.shape
    flat = lab.view(B, -1)
    sizes = torch.zeros(B, H * W + 1, dtype=torch.long, device=mask.device)
    sizes.scatter_add_(1, flat, torch.ones_like(flat))
    keep = sizes.gather(1, flat) >= min_size
    return (keep.view(B, H, W)) & mask


def detect(codes: Tensor, step: ConceptStep, settings: DetectionSettings | None = None) -> Detection:
    """codes [B, H, W, M] + the concept's latents at this step -> Detection(score, mask)."""
    _check_grid(codes, "detect")
    total = code_mass(codes) if settings is not None and settings.min_share > 0 else None
    return detect_picked(codes.index_select(-1, step.latents.to(codes.device)), step, settings, total)


def code_mass(codes: Tensor) -> Tensor:
    """[..., M] codes (or a TopK code's values [..., k]) -> [...] float32 sum of the positive codes of each patch."""
    return codes.float().clamp_min(0).sum(-1)


def concept_share(picked: Tensor, thresholds: Tensor, total: Tensor, scale: float = 1.0) -> Tensor:
    """[B, H, W] float32: the share of each patch's code mass (``total``, see ``code_mass``) carried by the selected
    latents above scale * tau (picked [B, H, W, K]); 0 where the patch has no code."""
    above = picked.float() > float(scale) * thresholds.to(picked.device, torch.float32)
    mass = torch.where(above, picked.float(), picked.new_zeros((), dtype=torch.float32)).sum(-1)
    return torch.where(total > 0, mass / total.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(mass))


def detect_picked(picked: Tensor, step: ConceptStep, settings: DetectionSettings | None = None,
                  total: Tensor | None = None, keep_share: Tensor | None = None) -> Detection:
    """Same as ``detect`` from picked [B, H, W, K] = the codes of ``step.latents`` only (see ``pick_topk``) and,
    for ``min_share``, each patch's code mass ``total`` [B, H, W] (``code_mass`` of its full code).

    keep_share [B, H, W]: the largest share of each patch's code that a concept to keep carries (``keep_shares``);
    a patch is then detected only where the concept's own share (``concept_share``, needs ``total``) reaches it.
    Applied with min_share, before min_region and padding."""
    _check_grid(picked, "detect_picked")
    if picked.shape[-1] != step.latents.numel():
        raise SAEInputError(f"detect_picked: picked codes have {picked.shape[-1]} latents, the step selects "
                         f"{step.latents.numel()}; pick the columns step.latents")
    settings = settings or DetectionSettings()
    score = score_from_picked(picked, step.thresholds, settings.threshold_scale)
    mask = score > 0
    if settings.min_share > 0 or keep_share is not None:
        if total is None or tuple(total.shape) != tuple(picked.shape[:3]):
            raise SAEInputError(f"detect_picked: min_share {settings.min_share} (or concepts to keep) needs each "
                                f"patch's code mass [B, H, W] {tuple(picked.shape[:3])}, got "
                                f"{None if total is None else tuple(total.shape)}")
        own = concept_share(picked, step.thresholds, total.to(picked.device), settings.threshold_scale)
        if settings.min_share > 0:
            mask &= own >= settings.min_share
        if keep_share is not None:
            if tuple(keep_share.shape) != tuple(picked.shape[:3]):
                raise SAEInputError(f"detect_picked: keep_share has shape {tuple(keep_share.shape)}, expected "
                                    f"{tuple(picked.shape[:3])} (one share per patch)")
            mask &= own >= keep_share.to(own.device)
    mask = drop_small_regions(mask, int(settings.min_region))
    mask = dilate_mask(mask, int(settings.padding))
    return Detection(score, mask)


class ConceptDetector:
    """Several concepts (from one or more dictionaries) -> one mask (union) per step.

    concepts: a ConceptDictionary (all its concepts) or a sequence of (dictionary, names or None).
    sae: when given, every dictionary is checked against it (ConceptMismatchError on a mismatch).
    keep: concepts to keep, in the same forms: a patch is detected only where the concepts' selected latents above
        threshold carry at least as large a share of its code as each concept to keep carries (``keep_shares``).
        Neighbouring concepts share latents (circles and squares on the Shapes world's shape SAE): the detector
        of one then fires, weaker, on the other's objects, where the other's own latents dominate.
    """

    def __init__(
        self,
        concepts: ConceptDictionary | Sequence[tuple[ConceptDictionary, Iterable[str] | None]],
        settings: DetectionSettings | None = None,
        sae=None,
        keep: ConceptDictionary | Sequence[tuple[ConceptDictionary, Iterable[str] | None]] | None = None,
    ):
        self.sources = _as_sources(concepts)
        if not self.sources:
            raise SAEInputError("ConceptDetector: no concept given; connect a CONCEPT or type latent ids")
        self.keep = _as_sources(keep) if keep is not None else []
        m = {d.n_latents for d, _ in self.sources + self.keep}
        if len(m) != 1:
            raise SAEInputError(f"ConceptDetector: dictionaries were learned for SAEs of different widths {sorted(m)}")
        for d, names in self.sources + self.keep:
            d.concept_indices(names)  # KeyError for unknown names, now rather than mid-sampling
            if sae is not None:
                d.check_compatible(sae)
        both = sorted({n for d, names in self.sources for n in (names or d.names)}
                      & {n for d, names in self.keep for n in (names or d.names)})
        if both:
            raise SAEInputError(f"ConceptDetector: {both} both detected and kept; a concept to keep must be another "
                                "concept than the ones detected (remove it from keep)")
        self.settings = settings or DetectionSettings()
        self.n_latents = m.pop()
        self._steps: dict[float, ConceptStep] = {}
        self._latents: dict[tuple[float, torch.device], tuple[ConceptStep, Tensor]] = {}
        self._keep_on: dict[tuple[float, torch.device], list[tuple[Tensor, Tensor]]] = {}

    def step(self, timestep: float) -> ConceptStep:
        """The merged ConceptStep at ``timestep``; cached (a run asks for the same few timesteps at every call)."""
        key = float(timestep)
        hit = self._steps.get(key)
        if hit is None:
            hit = ConceptStep.merge([d.at(timestep, names) for d, names in self.sources])
            if len(self._steps) >= 1024:  # continuous-time schedules: keep the cache bounded
                self._steps.clear()
            self._steps[key] = hit
        return hit

    def detect_codes(self, codes: Tensor | TopKCodes, timestep: float) -> StepDetection:
        """The hot path's one call: the concepts at ``timestep``, the codes of their latents and the detection, from
        dense codes [B, H, W, M] or TopK codes (values, indices [B, H, W, k]), which are never expanded to M."""
        st = self.step(timestep)
        share = self.settings.min_share > 0 or bool(self.keep)
        if isinstance(codes, TopKCodes):
            device = codes.indices.device

            def pick(lat: Tensor) -> Tensor:
                return pick_topk(codes.values, codes.indices, lat)
            total = code_mass(codes.values) if share else None
        else:
            device = codes.device

            def pick(lat: Tensor) -> Tensor:
                return codes.index_select(-1, lat)
            total = code_mass(codes) if share else None
        picked = pick(self._latents_on(st, timestep, device))
        keep_share = None
        if self.keep:
            keep_share = keep_shares(pick, self._keep_steps_on(timestep, device), total, self.settings.threshold_scale)
        return StepDetection(st, picked, detect_picked(picked, st, self.settings, total, keep_share))

    def keep_steps(self, timestep: float) -> list[ConceptStep]:
        """One ConceptStep per concept to keep at ``timestep`` (each concept's share counts on its own)."""
        return [d.at(timestep, [n]) for d, names in self.keep for n in (names or d.names)]

    def _keep_steps_on(self, timestep: float, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """(latents, thresholds) of each concept to keep on ``device``, copied once per timestep and device."""
        key = (float(timestep), device)
        hit = self._keep_on.get(key)
        if hit is None:
            hit = [(s.latents.to(device), s.thresholds.to(device)) for s in self.keep_steps(timestep)]
            if len(self._keep_on) >= 1024:
                self._keep_on.clear()
            self._keep_on[key] = hit
        return hit

    def _latents_on(self, st: ConceptStep, timestep: float, device: torch.device) -> Tensor:
        """``st.latents`` on ``device``, copied once per timestep and device (no transfer per call). Device threads
        of multi-GPU sampling share the cache; a lost race costs one copy."""
        key = (float(timestep), device)
        hit = self._latents.get(key)
        if hit is None or hit[0] is not st:
            hit = (st, st.latents.to(device))
            if len(self._latents) >= 1024:
                self._latents.clear()
            self._latents[key] = hit
        return hit[1]

    def detect_picked(self, picked: Tensor, step: ConceptStep, total: Tensor | None = None,
                      keep_share: Tensor | None = None) -> Detection:
        """Detection from the codes of ``step.latents`` only, [B, H, W, K] (TopK hot path, see ``pick_topk``), and
        for ``min_share`` and the concepts to keep each patch's code mass [B, H, W] (``code_mass``); with concepts
        to keep, their ``keep_shares`` (which need the full codes)."""
        if self.keep and keep_share is None:
            raise SAEInputError("ConceptDetector.detect_picked: this detector keeps concepts "
                                f"{[n for d, names in self.keep for n in (names or d.names)]}; pass their keep_share "
                                "(keep_shares of the full codes) or use detect_codes")
        return detect_picked(picked, step, self.settings, total, keep_share)

    def __call__(self, codes: Tensor, timestep: float) -> tuple[Detection, ConceptStep]:
        if codes.shape[-1] != self.n_latents:
            raise SAEInputError(
                f"ConceptDetector: codes have {codes.shape[-1]} latents, the concepts expect {self.n_latents}; "
                "use the SAE the concepts were learned with"
            )
        _check_grid(codes, "ConceptDetector")
        found = self.detect_codes(codes, timestep)
        return found.detection, found.step


def _as_sources(concepts) -> list[tuple[ConceptDictionary, tuple[str, ...] | None]]:
    if isinstance(concepts, ConceptDictionary):
        concepts = [(concepts, None)]
    return [(d, None if n is None else tuple(n)) for d, n in concepts]


def keep_shares(pick, keep: Sequence[tuple[Tensor, Tensor]], total: Tensor, scale: float = 1.0) -> Tensor:
    """[B, H, W] float32: the largest share of each patch's code mass ``total`` that one concept to keep carries
    (``concept_share`` of its latents above scale * tau); ``pick(latents)`` returns the codes of those latents
    [B, H, W, K] (``pick_topk`` for TopK codes, ``index_select`` for dense codes); keep: (latents, thresholds) per
    concept. 0 where none is given."""
    out = torch.zeros_like(total, dtype=torch.float32)
    for lat, tau in keep:
        if lat.numel():
            out = torch.maximum(out, concept_share(pick(lat), tau, total, scale))
    return out
