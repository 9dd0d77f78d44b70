"""Concept dictionaries: SAeUron per-timestep scores, latent selection, thresholds; save, load, share.

A dictionary holds, for each concept c and each stored timestep t, the selected latents S_c(t) with
their score, their threshold tau_i(t) and the concept's mean code mu_c,i(t) (needed by SAeUron's
ablation f_i <- f_i * gamma * mu_c,i(t)). Per concept and timestep the selection has a variable size,
stored as a ``[C, T, K]`` index tensor padded with -1 (K = the largest selection): compact, because
only selected latents are kept, and directly usable as a gather index.

Lookup is by nearest stored timestep, so statistics learned with a 100-step sampler serve a 1- or
4-step one. Formulas: /work/shared/REFERENCE.md section 3.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from .errors import SAEError
from .fileio import save_safetensors

logger = logging.getLogger(__name__)

FORMAT_NAME = "sae-concepts"
FORMAT_VERSION = 1
METADATA_KEY = "sae_concepts"
SCORE_EPS = 1e-8  # SAeUron's denominator guard
_TENSOR_KEYS = ("timesteps", "latents", "scores", "thresholds", "means")
METHODS = ("percentile", "top_n", "specific")


class ConceptFileError(SAEError, ValueError):
    """A concept file is not readable as a concept dictionary (wrong format, keys, shapes)."""


class ConceptMismatchError(SAEError, ValueError):
    """A concept dictionary is used with an SAE it was not learned with."""


# ----------------------------------------------------------------------------------------------
# Selection rule


@dataclass(frozen=True)
class SelectionRule:
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
        if self.method not in METHODS:
            raise ValueError(f"SelectionRule.method is {self.method!r}, expected one of {list(METHODS)}")
        if not (0.0 <= float(self.max_ratio) <= 1.0):
            raise ValueError(f"SelectionRule.max_ratio is {self.max_ratio}, expected a value in [0, 1] (e.g. 0.2)")
        if not (0.0 <= float(self.min_rate) < 1.0):
            raise ValueError(f"SelectionRule.min_rate is {self.min_rate}, expected a share of patches in [0, 1)")
        if self.method == "percentile" and not (0.0 < float(self.percentile) < 100.0):
            raise ValueError(
                f"SelectionRule.percentile is {self.percentile}, expected a value in (0, 100), "
                "e.g. 99.99 (SAeUron objects) or 99.999 (styles)"
            )
        if self.method in ("top_n", "specific") and int(self.top_n) < 1:
            raise ValueError(f"SelectionRule.top_n is {self.top_n}, expected an integer >= 1")
        if self.fixed_threshold is not None and not math.isfinite(float(self.fixed_threshold)):
            raise ValueError(f"SelectionRule.fixed_threshold is {self.fixed_threshold}, expected a finite number or None")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> SelectionRule:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"SelectionRule: unknown keys {sorted(unknown)}; expected {[f.name for f in fields(cls)]}")
        return cls(**dict(d))


# ----------------------------------------------------------------------------------------------
# Pure statistics -> scores -> selection


def saeuron_scores(mu_c: Tensor, mu_notc: Tensor) -> Tensor:
    """score_i(t) = mu_c,i / (sum_j mu_c,j + 1e-8) - mu_notc,i / (sum_j mu_notc,j + 1e-8).

    mu_c, mu_notc: [T, M] mean codes of the concept and of everything else; returns [T, M] float64.
    """
    if mu_c.shape != mu_notc.shape or mu_c.ndim != 2:
        raise ValueError(f"saeuron_scores: mu_c {tuple(mu_c.shape)} and mu_notc {tuple(mu_notc.shape)} must both be [T, M]")
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


def specific_latents(rate_c: Tensor, rate_notc: Tensor, rule: SelectionRule) -> tuple[Tensor, list[Tensor]]:
    """The "specific" rule: rate_c, rate_notc [T, M] firing rates -> (scores r_c - r_notc [T, M] float64,
    per timestep the kept latent ids, best score first, at most rule.top_n)."""
    if rate_c.shape != rate_notc.shape or rate_c.ndim != 2:
        raise ValueError(f"specific_latents: rates {tuple(rate_c.shape)} and {tuple(rate_notc.shape)} must both be [T, M]")
    rc, rn = rate_c.double(), rate_notc.double()
    scores = rc - rn
    keep = (rn <= float(rule.max_ratio) * rc) & (rc >= float(rule.min_rate)) & (rc > 0)
    out = []
    for row, ok in zip(scores, keep, strict=True):
        ids = torch.nonzero(ok).flatten()
        order = torch.argsort(row[ids], descending=True, stable=True)
        out.append(ids[order][: int(rule.top_n)])
    return scores, out


def concept_thresholds(means: Tensor) -> Tensor:
    """SAeUron's tau_i(t): mean over all concepts of mu_c,i(t). means [C, T, M] -> [T, M]."""
    return means.double().mean(0)


class ConceptStats(NamedTuple):
    """Per-concept, per-timestep mean codes (cond branch, averaged over patches and prompts)."""

    names: tuple[str, ...]
    timesteps: Tensor  # [T] float64
    means: Tensor  # [C, T, M] float64
    counts: Tensor  # [C, T] float64: rows averaged (weights mu_notc by prompts, as a mean over all prompts)
    rates: Tensor | None = None  # [C, T, M] float64 share of rows where each latent is active (rule "specific")


class ConceptStatsAccumulator:
    """Running per-(concept, timestep) mean of SAE codes, fed while sampling (Learn Concept).

    Sums are kept in float64 on the CPU: C x T x M values, about 50 MB for 3 concepts x 100 steps x
    20480 latents. Timesteps are matched after rounding to 1e-3.
    """

    def __init__(self, n_latents: int):
        if int(n_latents) < 1:
            raise ValueError(f"ConceptStatsAccumulator: n_latents is {n_latents}, expected >= 1")
        self.n_latents = int(n_latents)
        self._sums: dict[str, dict[float, Tensor]] = {}
        self._fires: dict[str, dict[float, Tensor]] = {}
        self._counts: dict[str, dict[float, int]] = {}

    def add(self, concept: str, timestep: float, codes: Tensor) -> None:
        """Add codes [..., M] (every leading position counts as one row) for one concept and step."""
        if codes.shape[-1] != self.n_latents:
            raise ValueError(
                f"ConceptStatsAccumulator.add({concept!r}): codes have {codes.shape[-1]} latents, "
                f"expected {self.n_latents}; feed codes of the SAE this accumulator was made for"
            )
        key = round(float(timestep), 3)
        rows = codes.reshape(-1, self.n_latents)
        s = rows.sum(0, dtype=torch.float32 if rows.device.type == "mps" else torch.float64)
        s = s.detach().to("cpu", torch.float64)
        f = (rows > 0).sum(0).detach().to("cpu", torch.float64)
        per_t = self._sums.setdefault(concept, {})
        fires = self._fires.setdefault(concept, {})
        cnt = self._counts.setdefault(concept, {})
        if key in per_t:
            per_t[key] += s
            fires[key] += f
            cnt[key] += rows.shape[0]
        else:
            per_t[key] = s
            fires[key] = f
            cnt[key] = rows.shape[0]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._sums)

    def stats(self) -> ConceptStats:
        if len(self._sums) < 2:
            raise ValueError(
                f"ConceptStatsAccumulator: have concepts {list(self._sums)}, need at least 2 "
                "(a concept and a contrast set) to compute SAeUron scores"
            )
        names = tuple(self._sums)
        keys = sorted(self._sums[names[0]], reverse=True)
        for n in names[1:]:
            if set(self._sums[n]) != set(keys):
                missing = sorted(set(keys) ^ set(self._sums[n]))
                raise ValueError(
                    f"ConceptStatsAccumulator: concept {n!r} was recorded at other timesteps than {names[0]!r} "
                    f"(differing: {missing[:8]}); sample every concept with the same sampler and steps"
                )
        sums = torch.stack([torch.stack([self._sums[n][k] for k in keys]) for n in names])
        fires = torch.stack([torch.stack([self._fires[n][k] for k in keys]) for n in names])
        counts = torch.tensor([[float(self._counts[n][k]) for k in keys] for n in names], dtype=torch.float64)
        return ConceptStats(names, torch.tensor(keys, dtype=torch.float64), sums / counts[..., None], counts,
                            fires / counts[..., None])


# ----------------------------------------------------------------------------------------------
# The dictionary


class ConceptStep(NamedTuple):
    """What a detector needs at one timestep: selected latents of the requested concepts (union)."""

    latents: Tensor  # [K] int64, unique
    thresholds: Tensor  # [K] float32 tau_i(t)
    means: Tensor  # [K] float32 mu_c,i(t) of the concept that contributed the latent
    concept: Tensor  # [K] int64 index into names of the contributing concept
    timestep: float  # the stored timestep that was used

    @staticmethod
    def merge(steps: Sequence[ConceptStep]) -> ConceptStep:
        """Union of several steps; a latent that appears twice keeps its first entry."""
        if not steps:
            raise ValueError("ConceptStep.merge: no steps given")
        lat = torch.cat([s.latents for s in steps])
        keep = _first_occurrence(lat)
        return ConceptStep(
            lat[keep],
            torch.cat([s.thresholds for s in steps])[keep],
            torch.cat([s.means for s in steps])[keep],
            torch.cat([s.concept for s in steps])[keep],
            steps[0].timestep,
        )


def _first_occurrence(ids: Tensor) -> Tensor:
    seen: set[int] = set()
    keep = []
    for j, v in enumerate(ids.tolist()):
        if v not in seen:
            seen.add(v)
            keep.append(j)
    return torch.tensor(keep, dtype=torch.long)


@dataclass
class ConceptMeta:
    """Provenance stored with a dictionary (JSON metadata of the file)."""

    sae_fingerprint: str | None = None
    hook_point: str | None = None
    model_family: str | None = None
    prompts: dict[str, list[str]] = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class ConceptDictionary:
    """Several concepts' per-timestep latent selections (see module docstring for the layout)."""

    names: tuple[str, ...]
    n_latents: int
    timesteps: Tensor  # [T] float32
    latents: Tensor  # [C, T, K] int64, -1 = padding
    scores: Tensor  # [C, T, K] float32 (0 at padding)
    thresholds: Tensor  # [C, T, K] float32 tau_i(t)
    means: Tensor  # [C, T, K] float32 mu_c,i(t)
    meta: ConceptMeta = field(default_factory=ConceptMeta)

    def __post_init__(self):
        self.names = tuple(self.names)
        C, T = len(self.names), self.timesteps.numel()
        if len(set(self.names)) != C or C == 0:
            raise ConceptFileError(f"concept names must be unique and non-empty, found {list(self.names)}")
        if self.timesteps.ndim != 1 or T == 0:
            raise ConceptFileError(f"timesteps must be a non-empty [T] tensor, found shape {tuple(self.timesteps.shape)}")
        if self.latents.ndim != 3 or tuple(self.latents.shape[:2]) != (C, T):
            raise ConceptFileError(
                f"latents has shape {tuple(self.latents.shape)}, expected ({C}, {T}, K) for {C} concepts and {T} timesteps"
            )
        for key in ("scores", "thresholds", "means"):
            if tuple(getattr(self, key).shape) != tuple(self.latents.shape):
                raise ConceptFileError(
                    f"{key} has shape {tuple(getattr(self, key).shape)}, expected {tuple(self.latents.shape)} like latents"
                )
        if self.latents.numel() and (int(self.latents.max()) >= self.n_latents or int(self.latents.min()) < -1):
            raise ConceptFileError(
                f"latent ids range {int(self.latents.min())}..{int(self.latents.max())}, expected -1 (padding) "
                f"or 0..{self.n_latents - 1}"
            )
        self.timesteps = self.timesteps.float()
        self.latents = self.latents.long()
        self.scores, self.thresholds, self.means = (self.scores.float(), self.thresholds.float(), self.means.float())

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_latents(
        cls,
        latents: Sequence[int],
        n_latents: int,
        threshold: float = 0.0,
        means: Sequence[float] | None = None,
        name: str = "latents",
        sae_fingerprint: str | None = None,
    ) -> ConceptDictionary:
        """A timestep-independent concept from typed latent ids (fixed threshold, optional mu)."""
        ids = torch.tensor([int(i) for i in latents], dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("ConceptDictionary.from_latents: no latent ids given; type at least one id")
        bad = [int(i) for i in ids if not 0 <= int(i) < n_latents]
        if bad:
            raise ValueError(f"ConceptDictionary.from_latents: latent ids {bad} out of range 0..{n_latents - 1} for this SAE")
        if len(set(ids.tolist())) != ids.numel():
            raise ValueError(f"ConceptDictionary.from_latents: latent ids {ids.tolist()} contain duplicates")
        mu = torch.ones(ids.numel()) if means is None else torch.tensor([float(m) for m in means])
        if mu.numel() != ids.numel():
            raise ValueError(f"ConceptDictionary.from_latents: {mu.numel()} means for {ids.numel()} latents")
        shape = (1, 1, ids.numel())
        return cls(
            (name,), int(n_latents), torch.zeros(1), ids.view(shape), torch.zeros(shape),
            torch.full(shape, float(threshold)), mu.view(shape).float(),
            ConceptMeta(sae_fingerprint=sae_fingerprint, selection={"method": "typed", "fixed_threshold": float(threshold)}),
        )

    # -- lookup --------------------------------------------------------------------------------

    def timestep_index(self, timestep: float) -> int:
        """Nearest stored timestep (ties: the first stored)."""
        return int(torch.argmin((self.timesteps.double() - float(timestep)).abs()))

    def at(self, timestep: float, names: Iterable[str] | None = None) -> ConceptStep:
        """Union of the selections of ``names`` (default all) at the nearest stored timestep."""
        idx = self.concept_indices(names)
        ti = self.timestep_index(timestep)
        steps = []
        for c in idx:
            lat = self.latents[c, ti]
            valid = lat >= 0
            steps.append(
                ConceptStep(
                    lat[valid], self.thresholds[c, ti][valid], self.means[c, ti][valid],
                    torch.full((int(valid.sum()),), c, dtype=torch.long), float(self.timesteps[ti]),
                )
            )
        return ConceptStep.merge(steps)

    def concept_indices(self, names: Iterable[str] | None) -> list[int]:
        if names is None:
            return list(range(len(self.names)))
        out = []
        for n in names:
            if n not in self.names:
                raise KeyError(f"concept {n!r} is not in this dictionary; it holds {list(self.names)}")
            out.append(self.names.index(n))
        return out

    # -- compatibility -------------------------------------------------------------------------

    def check_compatible(self, sae, source: str | None = None) -> None:
        """Raise ConceptMismatchError unless this dictionary was learned with ``sae``."""
        where = source or self.meta.extra.get("source") or "concept dictionary"
        sae_src = getattr(sae, "source", None) or "the given SAE"
        m = int(sae.cfg.n_latents)
        if m != self.n_latents:
            raise ConceptMismatchError(
                f"{where}: learned for an SAE with {self.n_latents} latents, but {sae_src} has {m}; "
                "load the SAE the concept was learned with, or learn the concept again with this SAE"
            )
        if self.meta.sae_fingerprint is not None:
            fp = sae.fingerprint()
            if fp != self.meta.sae_fingerprint:
                raise ConceptMismatchError(
                    f"{where}: learned with SAE fingerprint {self.meta.sae_fingerprint}, but {sae_src} has "
                    f"fingerprint {fp}; load the SAE the concept was learned with, or learn the concept again"
                )

    # -- export --------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Readable structure: per concept, per timestep, the selected latents with score, tau, mu."""
        concepts = {}
        for c, name in enumerate(self.names):
            rows = []
            for ti in range(self.timesteps.numel()):
                lat = self.latents[c, ti]
                valid = (lat >= 0).nonzero().flatten().tolist()
                rows.append({
                    "timestep": float(self.timesteps[ti]),
                    "latents": [
                        {
                            "id": int(lat[j]), "score": float(self.scores[c, ti, j]),
                            "tau": float(self.thresholds[c, ti, j]), "mu": float(self.means[c, ti, j]),
                        }
                        for j in valid
                    ],
                })
            concepts[name] = rows
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **self._meta_dict(), "concepts": concepts}

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 1) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    def _meta_dict(self) -> dict:
        m = self.meta
        return {
            "names": list(self.names), "n_latents": self.n_latents, "sae_fingerprint": m.sae_fingerprint,
            "hook_point": m.hook_point, "model_family": m.model_family, "prompts": m.prompts,
            "selection": m.selection, "extra": {k: v for k, v in m.extra.items() if k != "source"},
        }

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **self._meta_dict()}
        tensors = {
            "timesteps": self.timesteps.contiguous(), "latents": self.latents.to(torch.int32).contiguous(),
            "scores": self.scores.contiguous(), "thresholds": self.thresholds.contiguous(),
            "means": self.means.contiguous(),
        }
        save_safetensors(tensors, path, metadata={METADATA_KEY: json.dumps(header)})  # atomic, 0666 minus umask
        logger.info("saved concept dictionary %s (%s) to %s", list(self.names), self.timesteps.numel(), path)


def load_concepts(path: str | os.PathLike, sae=None) -> ConceptDictionary:
    """Load a dictionary written by ``ConceptDictionary.save``; with ``sae``, check it belongs to it."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: concept file not found")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            keys = set(fh.keys())
            tensors = {k: fh.get_tensor(k) for k in keys}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ConceptFileError(f"{path}: not a readable safetensors file ({e}); expected a concept file saved by this pack") from e
    if METADATA_KEY not in meta:
        raise ConceptFileError(
            f"{path}: metadata has no {METADATA_KEY!r} entry (found {sorted(meta)}); this is not a concept "
            "dictionary (an SAE checkpoint belongs in models/sae, concepts in models/sae_concepts)"
        )
    try:
        header = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ConceptFileError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from e
    if header.get("format") != FORMAT_NAME or header.get("format_version") != FORMAT_VERSION:
        raise ConceptFileError(
            f"{path}: format {header.get('format')!r} version {header.get('format_version')!r}, expected "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}; update the pack or re-save the concept"
        )
    missing = [k for k in _TENSOR_KEYS if k not in keys]
    if missing:
        raise ConceptFileError(f"{path}: missing tensors {missing}; found {sorted(keys)}, expected {list(_TENSOR_KEYS)}")
    for k in ("names", "n_latents"):
        if k not in header:
            raise ConceptFileError(f"{path}: metadata lacks {k!r}; found keys {sorted(header)}")
    try:
        d = ConceptDictionary(
            tuple(header["names"]), int(header["n_latents"]), tensors["timesteps"], tensors["latents"],
            tensors["scores"], tensors["thresholds"], tensors["means"],
            ConceptMeta(
                header.get("sae_fingerprint"), header.get("hook_point"), header.get("model_family"),
                dict(header.get("prompts") or {}), dict(header.get("selection") or {}),
                {**dict(header.get("extra") or {}), "source": path},
            ),
        )
    except ConceptFileError as e:
        raise ConceptFileError(f"{path}: {e}") from e
    if sae is not None:
        d.check_compatible(sae, source=path)
    return d


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
        raise ValueError(f"build_concept_dictionary: {C} concept(s) {list(names)}; need at least 2 (a concept and a contrast)")
    if stats.counts.shape != (C, T) or stats.timesteps.shape != (T,) or len(names) != C:
        raise ValueError(
            f"build_concept_dictionary: inconsistent stats: names {len(names)}, timesteps {tuple(stats.timesteps.shape)}, "
            f"means {tuple(stats.means.shape)}, counts {tuple(stats.counts.shape)}"
        )
    keep = list(names) if keep is None else list(keep)
    for k in keep:
        if k not in names:
            raise KeyError(f"build_concept_dictionary: keep names {k!r}, not among the recorded concepts {list(names)}")
    means = stats.means.double()
    w = stats.counts.double()[..., None]  # [C, T, 1]
    tau_all = concept_thresholds(means) if rule.fixed_threshold is None else None
    total = (means * w).sum(0)
    wsum = w.sum(0)
    if rule.method == "specific":
        if stats.rates is None or stats.rates.shape != means.shape:
            raise ValueError(
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
            scores, sel = specific_latents(rates[c], rate_notc, rule)
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


# ----------------------------------------------------------------------------------------------
# SAeUron's published statistics


def ddim_leading_timesteps(steps: int, train_steps: int = 1000, offset: int = 1) -> Tensor:
    """Model timesteps of diffusers' DDIM with "leading" spacing and steps_offset (SD 1.x defaults):
    step i (0 = first, noisiest) -> (steps - 1 - i) * (train_steps // steps) + offset."""
    ratio = train_steps // steps
    return (torch.arange(steps - 1, -1, -1, dtype=torch.float64) * ratio + offset)


def import_saeuron_stats(path: str | os.PathLike, *, trust: bool = False, timesteps: Tensor | None = None) -> ConceptStats:
    """Read SAeUron's ``*_latents_dict_<hookpoint>.pkl`` ({concept: [prompts, steps, M] per-prompt, per-step mean
    codes}) into ConceptStats (counts = prompts per concept). Timesteps default to 100-step DDIM "leading" spacing
    (991 ... 1), the schedule those files were gathered with; pass ``timesteps`` [steps] otherwise.

    The file is a Python pickle, which can run arbitrary code when loaded: this refuses unless ``trust=True``.
    Use it offline on files you trust, then save the built dictionary as a safetensors concept file.
    """
    path = os.fspath(path)
    if not trust:
        raise PermissionError(
            f"{path}: SAeUron statistics are a Python pickle, which can execute code when loaded; refusing to unpickle. "
            "If you trust this file, pass trust=True (CLI: --trust), build the dictionary and share it as safetensors"
        )
    import pickle

    with open(path, "rb") as fh:
        raw = pickle.load(fh)  # noqa: S301 - the caller vouched for the file (trust=True)
    if not isinstance(raw, Mapping) or not raw:
        raise ConceptFileError(f"{path}: expected a non-empty dict {{concept: tensor [prompts, steps, M]}}, found {type(raw).__name__}")
    names, means, counts = [], [], []
    shape = None
    for name, t in raw.items():
        t = torch.as_tensor(t)
        if t.ndim != 3:
            raise ConceptFileError(f"{path}: concept {name!r} has shape {tuple(t.shape)}, expected [prompts, steps, M]")
        if shape is not None and tuple(t.shape[1:]) != shape:
            raise ConceptFileError(f"{path}: concept {name!r} has [steps, M] = {tuple(t.shape[1:])}, others have {shape}")
        shape = tuple(t.shape[1:])
        names.append(str(name))
        means.append(t.double().mean(0))
        counts.append(float(t.shape[0]))
    steps = shape[0]
    ts = ddim_leading_timesteps(steps) if timesteps is None else torch.as_tensor(timesteps, dtype=torch.float64)
    if ts.shape != (steps,):
        raise ValueError(f"{path}: {steps} steps in the file but timesteps has shape {tuple(ts.shape)}")
    cnt = torch.tensor(counts, dtype=torch.float64)[:, None].expand(len(names), steps).clone()
    return ConceptStats(tuple(names), ts, torch.stack(means), cnt)
