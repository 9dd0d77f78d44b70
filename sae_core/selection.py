"""Learning a concept: SAeUron's per-timestep scores, the latent selection rules, the thresholds, and
build_concept_dictionary (statistics -> ConceptDictionary). Formulas: docs/FORMULAS.md sections 5 and 8."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .concept_stats import ConceptStats
from .concepts import ConceptDictionary, ConceptMeta
from .errors import SAEInputError, SAELookupError, require_int, require_number
from .mixins import DictRoundTrip

logger = logging.getLogger(__name__)

SCORE_EPS = 1e-8  # SAeUron's denominator guard
METHODS = ("percentile", "top_n", "specific")


# ----------------------------------------------------------------------------------------------
# Selection rule


@dataclass(frozen=True)
class SelectionRule(DictRoundTrip):
    """How latents are chosen per timestep and what threshold they get.

    method: "percentile" keeps {i : score_i(t) > quantile(score(t), percentile / 100)} (torch.quantile,
        linear interpolation, strict comparison, as SAeUron); "top_n" keeps the n best scores.
    percentile: in (0, 100); with M = 20480, 99.999 / 99.995 / 99.99 keep 1 / 2 / 3 latents.
    top_n: number of latents per timestep for "top_n".
    fixed_threshold: None gives SAeUron's tau_i(t) = mean over all concepts of mu_c,i(t); a number
        gives that threshold to every selected latent.

    method "specific" (this pack's rule for localised detection; needs firing rates, which
    ConceptStatsAccumulator records): with r_c,i(t) the share of the concept prompts' patches where latent
    i is active and r_notc,i(t) the same over the other prompts, keep {i : r_notc,i <= max_ratio * r_c,i and
    r_c,i >= min_rate}, best r_c,i - r_notc,i first, at most top_n. SAeUron's score averages code
    magnitudes over the whole map, so latents that carry the prompt's context on every patch outrank the
    ones that fire on the object's patches only; requiring the latent to be (almost) silent without the
    concept keeps the localised ones.
    """

    method: str = "percentile"
    percentile: float = 99.99
    top_n: int = 1
    fixed_threshold: float | None = None
    max_ratio: float = 0.2
    min_rate: float = 0.002

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise SAEInputError(f"SelectionRule.method is {self.method!r}, expected one of {list(METHODS)}")
        max_ratio = require_number("SelectionRule.max_ratio", self.max_ratio)
        min_rate = require_number("SelectionRule.min_rate", self.min_rate)
        percentile = require_number("SelectionRule.percentile", self.percentile)
        if not (0.0 <= max_ratio <= 1.0):
            raise SAEInputError(f"SelectionRule.max_ratio is {self.max_ratio}, expected a value in [0, 1] (e.g. 0.2)")
        if not (0.0 <= min_rate < 1.0):
            raise SAEInputError(f"SelectionRule.min_rate is {self.min_rate}, expected a share of patches in [0, 1)")
        if self.method == "percentile" and not (0.0 < percentile < 100.0):
            raise SAEInputError(
                f"SelectionRule.percentile is {self.percentile}, expected a value in (0, 100), "
                "e.g. 99.99 (SAeUron objects) or 99.999 (styles)"
            )
        top_n = require_int("SelectionRule.top_n", self.top_n)
        if self.method in ("top_n", "specific") and top_n < 1:
            raise SAEInputError(f"SelectionRule.top_n is {self.top_n}, expected an integer >= 1")
        if self.fixed_threshold is not None:
            require_number("SelectionRule.fixed_threshold", self.fixed_threshold, minimum=0.0)


# ----------------------------------------------------------------------------------------------
# Pure statistics -> scores -> selection


def saeuron_scores(mu_c: Tensor, mu_notc: Tensor) -> Tensor:
    """score_i(t) = mu_c,i / (sum_j mu_c,j + 1e-8) - mu_notc,i / (sum_j mu_notc,j + 1e-8).

    mu_c, mu_notc: [T, M] mean codes of the concept and of everything else; returns [T, M] float64.
    """
    if mu_c.shape != mu_notc.shape or mu_c.ndim != 2:
        raise SAEInputError(f"saeuron_scores: mu_c {tuple(mu_c.shape)} and mu_notc {tuple(mu_notc.shape)} must both be [T, M]")
    a = mu_c.double()
    b = mu_notc.double()
    return a / (a.sum(-1, keepdim=True) + SCORE_EPS) - b / (b.sum(-1, keepdim=True) + SCORE_EPS)


def select_latents(scores: Tensor, rule: SelectionRule) -> list[Tensor]:
    """scores [T, M] -> per timestep the selected latent ids (int64), best score first."""
    out = []
    for row in scores:
        if rule.method == "percentile":
            q = torch.quantile(row, float(rule.percentile) / 100.0)
            ids = torch.nonzero(row > q).flatten()
        else:
            n = min(int(rule.top_n), row.numel())
            ids = torch.topk(row, n).indices
        order = torch.argsort(row[ids], descending=True, stable=True)
        out.append(ids[order])
    return out


def specific_latents(rate_c: Tensor, rate_notc: Tensor, rule: SelectionRule,
                     negatives: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """The "specific" rule: rate_c, rate_notc [T, M] firing rates -> (scores r_c - r_notc [T, M] float64,
    per timestep the kept latent ids, best score first, at most rule.top_n). ``negatives`` [G, T, M]: the rates
    of contrast groups that each count on their own: a kept latent also stays at or below max_ratio * r_c in
    every group (silent on a neighbouring concept, not only on average)."""
    if rate_c.shape != rate_notc.shape or rate_c.ndim != 2:
        raise SAEInputError(f"specific_latents: rates {tuple(rate_c.shape)} and {tuple(rate_notc.shape)} must both be [T, M]")
    rc, rn = rate_c.double(), rate_notc.double()
    scores = rc - rn
    keep = (rn <= float(rule.max_ratio) * rc) & (rc >= float(rule.min_rate)) & (rc > 0)
    if negatives is not None:
        if negatives.ndim != 3 or tuple(negatives.shape[1:]) != tuple(rc.shape):
            raise SAEInputError(f"specific_latents: negatives {tuple(negatives.shape)}, expected [G, {rc.shape[0]}, "
                                f"{rc.shape[1]}] (rates per contrast group, timestep and latent)")
        if negatives.shape[0]:
            keep &= negatives.double().amax(0) <= float(rule.max_ratio) * rc
    out = []
    for row, ok in zip(scores, keep, strict=True):
        ids = torch.nonzero(ok).flatten()
        order = torch.argsort(row[ids], descending=True, stable=True)
        out.append(ids[order][: int(rule.top_n)])
    return scores, out


def concept_thresholds(means: Tensor) -> Tensor:
    """SAeUron's tau_i(t): mean over all concepts of mu_c,i(t). means [C, T, M] -> [T, M]."""
    return means.double().mean(0)



# ----------------------------------------------------------------------------------------------
# Building


def build_concept_dictionary(
    stats: ConceptStats,
    rule: SelectionRule | None = None,
    keep: Sequence[str] | None = None,
    *,
    sae_fingerprint: str | None = None,
    hook_point: str | None = None,
    model_family: str | None = None,
    prompts: Mapping[str, Sequence[str]] | None = None,
    negatives: Tensor | None = None,
) -> ConceptDictionary:
    """SAeUron scores, selection and thresholds for every concept in ``keep`` (default all).

    Every concept in ``stats`` (kept or not, e.g. a contrast set) enters mu_notc and tau.
    mu_notc for c = the mean over all prompts of the other concepts = sum_{c' != c} counts * means /
    sum_{c' != c} counts.
    """
    rule = SelectionRule() if rule is None else rule
    names = tuple(stats.names)
    C, T, M = stats.means.shape
    if C < 2:
        raise SAEInputError(f"build_concept_dictionary: {C} concept(s) {list(names)}; need at least 2 (a concept and a contrast)")
    if stats.counts.shape != (C, T) or stats.timesteps.shape != (T,) or len(names) != C:
        raise SAEInputError(
            f"build_concept_dictionary: inconsistent stats: names {len(names)}, timesteps {tuple(stats.timesteps.shape)}, "
            f"means {tuple(stats.means.shape)}, counts {tuple(stats.counts.shape)}"
        )
    keep = list(names) if keep is None else list(keep)
    for k in keep:
        if k not in names:
            raise SAELookupError(f"build_concept_dictionary: keep names {k!r}, not among the recorded concepts {list(names)}")
    means = stats.means.double()
    w = stats.counts.double()[..., None]  # [C, T, 1]
    tau_all = concept_thresholds(means) if rule.fixed_threshold is None else None
    total = (means * w).sum(0)
    wsum = w.sum(0)
    if rule.method == "specific":
        if stats.rates is None or stats.rates.shape != means.shape:
            raise SAEInputError(
                "build_concept_dictionary: selection 'specific' needs firing rates [C, T, M] in the stats (recorded by "
                "ConceptStatsAccumulator); these stats have none (e.g. imported SAeUron means). Use 'percentile' or 'top_n'"
            )
        rates = stats.rates.double()
        rate_total = (rates * w).sum(0)
    per_concept = []
    for name in keep:
        c = names.index(name)
        if rule.method == "specific":
            rate_notc = (rate_total - rates[c] * w[c]) / (wsum - w[c])
            scores, sel = specific_latents(rates[c], rate_notc, rule, negatives)
            per_concept.append((c, scores, sel))
            continue
        mu_notc = (total - means[c] * w[c]) / (wsum - w[c])
        scores = saeuron_scores(means[c], mu_notc)
        per_concept.append((c, scores, select_latents(scores, rule)))
    K = max((ids.numel() for _, _, sel in per_concept for ids in sel), default=0)
    lat = torch.full((len(keep), T, K), -1, dtype=torch.long)
    sc, th, mu = (torch.zeros(len(keep), T, K) for _ in range(3))
    for k, (c, scores, sel) in enumerate(per_concept):
        for t, ids in enumerate(sel):
            n = ids.numel()
            lat[k, t, :n] = ids
            sc[k, t, :n] = scores[t, ids].float()
            mu[k, t, :n] = means[c, t, ids].float()
            th[k, t, :n] = float(rule.fixed_threshold) if tau_all is None else tau_all[t, ids].float()
    counts = [len(s) for _, _, sel in per_concept for s in sel]
    logger.info("built concept dictionary %s: %d timesteps, %s..%s latents per step", keep, T, min(counts), max(counts))
    if min(counts) == 0:
        logger.warning(
            "concept dictionary %s selects no latent at some timesteps (all scores tied at the quantile, or no latent "
            "specific enough for 'specific'); nothing will be detected there. Use a lower percentile, top_n, or a larger "
            "max_ratio", keep,
        )
    return ConceptDictionary(
        tuple(keep), M, stats.timesteps.float(), lat, sc, th, mu,
        ConceptMeta(
            sae_fingerprint, hook_point, model_family,
            {k: list(v) for k, v in (prompts or {}).items()}, rule.to_dict(), {"recorded_concepts": list(names)},
        ),
    )

