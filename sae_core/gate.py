"""Presence gate: learn, per concept and timestep, the share of detected patches that says "the concept is in
this image", from the per-image codes Learn Concept recorded for the concept's prompts and the contrast prompts.

The statistic is ``detect.detected_fraction``: the share of an image's patches where one of the concept's
selected latents exceeds its threshold tau (scale 1), before any region filter or padding. Contrast images
show a few scattered false detections, images of the concept a region of the object's size; the gate is the
fraction that separates the two best at each step:

  J(g) = TPR(g) - FPR(g), TPR = share of concept images with fraction >= g, FPR = the same for contrast images;
  g(t) = the middle of the widest run of candidate thresholds reaching max_g J (candidates: midpoints between
         consecutive observed fractions), so the gate sits in the gap between the two populations rather than
         on the edge of either;
  reliable(t) = J(g(t)) >= max(min_j, rel_j * max_t J): steps where presence can be read (early steps, before
         the layout forms, usually are not).

A step with no separation (J <= 0) gets gate 0 (never gates) and is not reliable. Concept prompts whose images
do not show the concept (the model did not follow the prompt) lower TPR but do not move the gap.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .concept_stats import ConceptStatsAccumulator
from .concepts import ConceptDictionary
from .detect import detected_fraction, pick_topk

logger = logging.getLogger(__name__)

MIN_J = 0.5  # a reliable step separates at least this well (TPR - FPR)
REL_J = 0.8  # ... and at least this share of the best step's separation


class GateFit(NamedTuple):
    gate: Tensor  # [T] float32 share of patches
    reliable: Tensor  # [T] bool
    youden: Tensor  # [T] float32 J at the chosen gate


def picked_from_sample(values: Tensor, ids: Tensor, latents: Tensor) -> Tensor:
    """Codes of ``latents`` [K] from kept top codes (values, ids [H, W, top]) -> [1, H, W, K] float32
    (0 where a latent was not among the kept codes): ``detect.pick_topk`` on one image."""
    return pick_topk(values.float(), ids.long(), latents)[None]


def best_threshold(pos: Tensor, neg: Tensor) -> tuple[float, float]:
    """(g, J): the threshold on a statistic that best separates ``pos`` (should be >= g) from ``neg`` (< g),
    at the middle of the widest plateau of maximal J; (0, J<=0) when nothing separates."""
    if pos.numel() == 0 or neg.numel() == 0:
        return 0.0, 0.0
    vals = torch.unique(torch.cat([pos, neg]).double())  # sorted
    cands = torch.cat([vals[:1] / 2, (vals[1:] + vals[:-1]) / 2, vals[-1:] + 1e-9])
    cands = cands[cands > 0]
    if cands.numel() == 0:
        return 0.0, 0.0
    tpr = (pos.double()[None, :] >= cands[:, None]).double().mean(1)
    fpr = (neg.double()[None, :] >= cands[:, None]).double().mean(1)
    j = tpr - fpr
    best = float(j.max())
    if best <= 0:
        return 0.0, best
    at_best = (j >= best - 1e-12).nonzero().flatten()
    # widest run of consecutive candidates at the maximum, then its middle (in the statistic's units)
    runs, start = [], int(at_best[0])
    prev = start
    for i in at_best[1:].tolist():
        if i != prev + 1:
            runs.append((start, prev))
            start = i
        prev = i
    runs.append((start, prev))
    lo, hi = max(runs, key=lambda r: float(cands[r[1]] - cands[r[0]]))
    return float((cands[lo] + cands[hi]) / 2), best


def sample_fractions(dictionary: ConceptDictionary, name: str, accumulator: ConceptStatsAccumulator
                     ) -> tuple[list[str], Tensor]:
    """(label of each kept image, [N, T] detected fraction at each of the dictionary's timesteps; NaN where the
    image has no codes at that step) for concept ``name``."""
    keys = list(accumulator.samples)
    T = dictionary.timesteps.numel()
    out = torch.full((len(keys), T), float("nan"))
    labels = []
    for n, key in enumerate(keys):
        labels.append(key[0])
        for ts, (vals, ids) in accumulator.samples[key].items():
            ti = dictionary.timestep_index(ts)
            st = dictionary.at(float(dictionary.timesteps[ti]), [name])
            out[n, ti] = float(detected_fraction(picked_from_sample(vals, ids, st.latents), st.thresholds)[0])
    return labels, out


def fit_gate(is_pos: Tensor, fractions: Tensor) -> GateFit:
    """Per timestep: the gate separating the images where ``is_pos`` [N] bool from the others."""
    T = fractions.shape[1]
    gate, js = torch.zeros(T), torch.zeros(T)
    for t in range(T):
        col = fractions[:, t]
        ok = ~torch.isnan(col)
        g, j = best_threshold(col[ok & is_pos], col[ok & ~is_pos])
        gate[t], js[t] = g, j
    best = float(js.max()) if T else 0.0
    reliable = (js >= max(MIN_J, REL_J * best)) & (gate > 0)
    return GateFit(gate, reliable, js)


def learn_presence_gate(dictionary: ConceptDictionary, accumulator: ConceptStatsAccumulator,
                        is_positive: Callable[[str, str], bool] | None = None) -> ConceptDictionary:
    """A copy of ``dictionary`` with the presence gate of each of its concepts learned from the per-image codes
    ``accumulator`` kept (``keep_samples=True`` and a sample id per sampling run).

    is_positive(concept, label): whether images kept under ``label`` show ``concept``; default label == concept
    (every other label is contrast)."""
    is_positive = is_positive or (lambda concept, label: label == concept)
    if not accumulator.samples:
        raise ValueError(
            "learn_presence_gate: the accumulator kept no per-image codes; create it with keep_samples=True and "
            "pass a sample id to add() (ConceptCollector.sample)"
        )
    labels_seen = {k[0] for k in accumulator.samples}
    gates, rel, counts = [], [], {}
    for name in dictionary.names:
        pos_labels = {lb for lb in labels_seen if is_positive(name, lb)}
        if not pos_labels or pos_labels == labels_seen:
            raise ValueError(f"learn_presence_gate: concept {name!r} needs kept images of its own prompts and of "
                             f"contrast prompts; kept labels {sorted(labels_seen)}")
        labels, fr = sample_fractions(dictionary, name, accumulator)
        is_pos = torch.tensor([is_positive(name, lb) for lb in labels], dtype=torch.bool)
        fit = fit_gate(is_pos, fr)
        counts[name] = {"concept_images": int(is_pos.sum()), "contrast_images": int((~is_pos).sum())}
        logger.info("presence gate %r: %d of %d steps reliable, J max %.2f, gate %.4f..%.4f", name,
                    int(fit.reliable.sum()), fit.gate.numel(), float(fit.youden.max()),
                    float(fit.gate.min()), float(fit.gate.max()))
        gates.append(fit.gate)
        rel.append(fit.reliable)
    meta = replace(dictionary.meta, extra={**dictionary.meta.extra, "gate": {
        "statistic": "detected_fraction", "min_j": MIN_J, "rel_j": REL_J, "images": counts}})
    return replace(dictionary, gate=torch.stack(gates), reliable=torch.stack(rel), meta=meta)
