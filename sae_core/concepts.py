"""The concept dictionary type and its file: per concept and timestep the selected latents with score, threshold
and mean code; lookup, save, load, share. Learning one from statistics: sae_core.selection.

A dictionary holds, for each concept c and each stored timestep t, the selected latents S_c(t) with
their score, their threshold tau_i(t) and the concept's mean code mu_c,i(t) (needed by SAeUron's
ablation f_i <- f_i * gamma * mu_c,i(t)). Per concept and timestep the selection has a variable size,
stored as a ``[C, T, K]`` index tensor padded with -1 (K = the largest selection): compact, because
only selected latents are kept, and directly usable as a gather index.

Lookup is by nearest stored timestep, so statistics learned with a 100-step sampler serve a 1- or
4-step one. Formulas: docs/FORMULAS.md sections 5 and 8.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import torch
from torch import Tensor

from .errors import (
    ConceptFileError,
    ConceptMismatchError,
    SAEError,
    SAEFileNotFoundError,
    SAEInputError,
    SAELookupError,
    require_number,
)
from .files import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

FORMAT_NAME = "sae-concepts"
FORMAT_VERSION = 2  # 2 adds the presence gate (optional tensors "gate", "reliable")
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "sae_concepts"
_TENSOR_KEYS = ("timesteps", "latents", "scores", "thresholds", "means")
_GATE_KEYS = ("gate", "reliable")


# ----------------------------------------------------------------------------------------------
# The dictionary


class ConceptStep(NamedTuple):
    """What a detector needs at one timestep: selected latents of the requested concepts (union)."""

    latents: Tensor  # [K] int64, unique
    thresholds: Tensor  # [K] float32 tau_i(t)
    means: Tensor  # [K] float32 mu_c,i(t) (the largest over the concepts that selected the latent)
    concept: Tensor  # [K] int64 index into names of the first concept that selected the latent
    timestep: float  # the stored timestep that was used
    gate: float = 0.0  # presence gate: share of detected patches that marks the concept present (0 = no gate)
    reliable: bool = True  # whether the gate separates concept from contrast prompts at this step

    @staticmethod
    def merge(steps: Sequence[ConceptStep]) -> ConceptStep:
        """Union of several steps. A latent selected by several concepts fires where any of them fires, so it gets
        the smallest of their thresholds, and the largest of their means, so SAeUron's ablation f * gamma * mu is
        as strong as each concept asks; neither depends on the order of the concepts. The gate of a union is the
        smallest of the steps' gates (0, no gate, when any concept has none), reliable when any is."""
        if not steps:
            raise SAEInputError("ConceptStep.merge: no steps given")
        lat = torch.cat([s.latents for s in steps])
        keep = _first_occurrence(lat)
        tau = torch.cat([s.thresholds for s in steps])
        mu = torch.cat([s.means for s in steps])
        gate = min(float(s.gate) for s in steps)
        reliable = any(bool(s.reliable) for s in steps)
        if keep.numel() != lat.numel():  # shared latents: reduce over every entry of the same id
            slot = torch.searchsorted(lat[keep].sort().values, lat)
            order = lat[keep].sort().indices
            K = keep.numel()
            tau_k = torch.full((K,), float("inf")).scatter_reduce(0, slot, tau.float(), "amin")
            mu_k = torch.full((K,), float("-inf")).scatter_reduce(0, slot, mu.float(), "amax")
            inv = torch.empty_like(order)
            inv[order] = torch.arange(K)
            return ConceptStep(lat[keep], tau_k[inv], mu_k[inv], torch.cat([s.concept for s in steps])[keep],
                               steps[0].timestep, gate, reliable)
        return ConceptStep(lat[keep], tau[keep], mu[keep], torch.cat([s.concept for s in steps])[keep],
                           steps[0].timestep, gate, reliable)


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
    gate: Tensor | None = None  # [C, T] float32 presence gate (share of patches), None = not learned
    reliable: Tensor | None = None  # [C, T] bool: steps where the gate separates concept from contrast

    def __post_init__(self):
        self.names = tuple(self.names)
        C, T = len(self.names), self.timesteps.numel()
        if len(set(self.names)) != C or C == 0 or not all(isinstance(n, str) and n for n in self.names):
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
        if not isinstance(self.n_latents, int) or isinstance(self.n_latents, bool) or self.n_latents <= 0:
            raise ConceptFileError(f"n_latents should be a positive integer, found {self.n_latents!r}")
        if self.latents.is_floating_point() or self.latents.dtype == torch.bool:
            raise ConceptFileError(f"latents have dtype {self.latents.dtype}, expected integer latent ids")
        if self.latents.numel() and (int(self.latents.max()) >= self.n_latents or int(self.latents.min()) < -1):
            raise ConceptFileError(
                f"latent ids range {int(self.latents.min())}..{int(self.latents.max())}, expected -1 (padding) "
                f"or 0..{self.n_latents - 1}"
            )
        if (self.gate is None) != (self.reliable is None):
            raise ConceptFileError("gate and reliable come together: both [C, T] tensors or both absent")
        if self.gate is not None:
            for key in ("gate", "reliable"):
                if tuple(getattr(self, key).shape) != (C, T):
                    raise ConceptFileError(f"{key} has shape {tuple(getattr(self, key).shape)}, expected ({C}, {T})")
            g = self.gate.float()
            if not bool(torch.isfinite(g).all()) or bool((g < 0).any()) or bool((g > 1).any()):
                raise ConceptFileError("gate holds values outside 0..1 (a share of patches); learn the concept again")
            self.gate, self.reliable = g, self.reliable.bool()
        for key in ("timesteps", "scores", "thresholds", "means"):
            t = getattr(self, key)
            if t.numel() and not bool(torch.isfinite(t.float()).all()):
                bad = int((~torch.isfinite(t.float())).sum())
                raise ConceptFileError(f"{key} holds {bad} NaN/inf values, expected finite numbers; learn or save "
                                       "the concept again")
        if self.thresholds.numel() and float(self.thresholds.min()) < 0:
            raise ConceptFileError(
                f"thresholds hold negative values (min {float(self.thresholds.min()):.4g}), expected values >= 0: SAE "
                "codes are never negative, so a negative threshold would mark every patch"
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
        if isinstance(latents, (str, bytes)) or not hasattr(latents, "__iter__"):
            raise SAEInputError(f"ConceptDictionary.from_latents: latents is {latents!r}, expected a list of latent ids")
        latents = list(latents)
        bad_ids = [i for i in latents if isinstance(i, bool) or not isinstance(i, (int, torch.Tensor))
                   or (isinstance(i, torch.Tensor) and (i.numel() != 1 or i.is_floating_point()))]
        if bad_ids:
            raise SAEInputError(f"ConceptDictionary.from_latents: latent ids {bad_ids} are not integers; type whole ids")
        t = require_number("ConceptDictionary.from_latents: threshold", threshold)
        if t < 0:
            raise SAEInputError(
                f"ConceptDictionary.from_latents: threshold is {threshold}, expected a finite number >= 0 (SAE codes "
                "are never negative, so a negative threshold would mark every patch)"
            )
        ids = torch.tensor([int(i) for i in latents], dtype=torch.long)
        if ids.numel() == 0:
            raise SAEInputError("ConceptDictionary.from_latents: no latent ids given; type at least one id")
        bad = [int(i) for i in ids if not 0 <= int(i) < n_latents]
        if bad:
            raise SAEInputError(f"ConceptDictionary.from_latents: latent ids {bad} out of range 0..{n_latents - 1} for this SAE")
        if len(set(ids.tolist())) != ids.numel():
            raise SAEInputError(f"ConceptDictionary.from_latents: latent ids {ids.tolist()} contain duplicates")
        if means is not None and (isinstance(means, (str, bytes)) or not hasattr(means, "__iter__")):
            raise SAEInputError(f"ConceptDictionary.from_latents: means is {means!r}, expected a list of numbers")
        mu = torch.ones(ids.numel()) if means is None else torch.tensor(
            [require_number("ConceptDictionary.from_latents: a mean", m, finite=False) for m in means])
        if not bool(torch.isfinite(mu).all()):
            raise SAEInputError(f"ConceptDictionary.from_latents: means {mu.tolist()} hold NaN/inf; expected finite numbers")
        if mu.numel() != ids.numel():
            raise SAEInputError(f"ConceptDictionary.from_latents: {mu.numel()} means for {ids.numel()} latents")
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
            gate = 0.0 if self.gate is None else float(self.gate[c, ti])
            reliable = True if self.reliable is None else bool(self.reliable[c, ti])
            steps.append(
                ConceptStep(
                    lat[valid], self.thresholds[c, ti][valid], self.means[c, ti][valid],
                    torch.full((int(valid.sum()),), c, dtype=torch.long), float(self.timesteps[ti]), gate, reliable,
                )
            )
        return ConceptStep.merge(steps)

    @property
    def has_gate(self) -> bool:
        return self.gate is not None

    def concept_indices(self, names: Iterable[str] | None) -> list[int]:
        if names is None:
            return list(range(len(self.names)))
        out = []
        for n in names:
            if n not in self.names:
                raise SAELookupError(f"concept {n!r} is not in this dictionary; it holds {list(self.names)}")
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
                gate = {} if self.gate is None else {"gate": float(self.gate[c, ti]),
                                                     "reliable": bool(self.reliable[c, ti])}
                rows.append({
                    "timestep": float(self.timesteps[ti]), **gate,
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
            atomic_write_text(path, text, what="concept JSON")
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
        from safetensors.torch import save_file

        header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **self._meta_dict()}
        tensors = {
            "timesteps": self.timesteps.contiguous(), "latents": self.latents.to(torch.int32).contiguous(),
            "scores": self.scores.contiguous(), "thresholds": self.thresholds.contiguous(),
            "means": self.means.contiguous(),
        }
        if self.gate is not None:
            tensors["gate"] = self.gate.contiguous()
            tensors["reliable"] = self.reliable.to(torch.uint8).contiguous()
        metadata = {METADATA_KEY: json.dumps(header)}
        # the installed safetensors need not write atomically (floor 0.4): a temporary file renamed over the target
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), what="concept file")
        logger.info("saved concept dictionary %s (%s) to %s", list(self.names), self.timesteps.numel(), path)


def _check_header(header: dict, path: str) -> None:
    """Types of the JSON header's entries, each named with what was expected and found."""
    names = header["names"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConceptFileError(f"{path}: metadata 'names' should be a list of non-empty strings, found {names!r}")
    n = header["n_latents"]
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ConceptFileError(f"{path}: metadata 'n_latents' should be a positive integer, found {n!r}")
    fp = header.get("sae_fingerprint")
    if fp is not None and (not isinstance(fp, str) or not fp):
        raise ConceptFileError(f"{path}: metadata 'sae_fingerprint' should be a string or null, found {fp!r}")
    for key in ("hook_point", "model_family"):
        if header.get(key) is not None and not isinstance(header[key], str):
            raise ConceptFileError(f"{path}: metadata {key!r} should be a string or null, found {header[key]!r}")
    prompts = header.get("prompts")
    if prompts is not None and (not isinstance(prompts, dict) or not all(
            isinstance(v, list) and all(isinstance(p, str) for p in v) for v in prompts.values())):
        raise ConceptFileError(
            f"{path}: metadata 'prompts' should be an object {{concept: [prompt, ...]}}, found {prompts!r}"[:300]
        )
    for key in ("selection", "extra"):
        if header.get(key) is not None and not isinstance(header[key], dict):
            raise ConceptFileError(f"{path}: metadata {key!r} should be an object, found {header[key]!r}"[:300])


def load_concepts(path: str | os.PathLike, sae=None) -> ConceptDictionary:
    """Load a dictionary written by ``ConceptDictionary.save``; with ``sae``, check it belongs to it."""
    from .formats._io import read_safetensors

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConceptFileError(f"{path}: is a directory, expected a concept .safetensors file")
    if not os.path.isfile(path):
        raise SAEFileNotFoundError(f"{path}: concept file not found")
    try:
        tensors, meta = read_safetensors(Path(path))
    except SAEError as e:  # truncated, foreign or unreadable: say what was expected here
        raise ConceptFileError(f"{e}; expected a concept file saved by this pack") from e
    keys = set(tensors)
    if METADATA_KEY not in meta:
        raise ConceptFileError(
            f"{path}: metadata has no {METADATA_KEY!r} entry (found {sorted(meta)}); this is not a concept "
            "dictionary (an SAE checkpoint belongs in models/sae, concepts in models/sae_concepts)"
        )
    try:
        header = json.loads(meta[METADATA_KEY])
    except (json.JSONDecodeError, RecursionError) as e:
        raise ConceptFileError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise ConceptFileError(
            f"{path}: metadata {METADATA_KEY!r} should be a JSON object, found a JSON {type(header).__name__}; "
            "the file was edited or written by another tool: save the concept again"
        )
    if header.get("format") != FORMAT_NAME or header.get("format_version") not in READABLE_VERSIONS:
        raise ConceptFileError(
            f"{path}: format {header.get('format')!r} version {header.get('format_version')!r}, expected "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION} (or {READABLE_VERSIONS[0]}); update the pack or re-save the concept"
        )
    missing = [k for k in _TENSOR_KEYS if k not in keys]
    if missing:
        raise ConceptFileError(f"{path}: missing tensors {missing}; found {sorted(keys)}, expected {list(_TENSOR_KEYS)}")
    for k in ("names", "n_latents"):
        if k not in header:
            raise ConceptFileError(f"{path}: metadata lacks {k!r}; found keys {sorted(header)}")
    _check_header(header, path)
    for k in ("timesteps", "scores", "thresholds", "means"):
        if not tensors[k].is_floating_point():
            raise ConceptFileError(
                f"{path}: tensor {k!r} has dtype {str(tensors[k].dtype).replace('torch.', '')}, expected a float dtype"
            )
    lat = tensors["latents"]
    if lat.is_floating_point() or lat.dtype == torch.bool or lat.is_complex():
        raise ConceptFileError(
            f"{path}: tensor 'latents' has dtype {str(lat.dtype).replace('torch.', '')}, expected integer latent ids "
            "(int32 or int64); float ids would be truncated to other latents"
        )
    try:
        d = ConceptDictionary(
            tuple(header["names"]), int(header["n_latents"]), tensors["timesteps"], tensors["latents"],
            tensors["scores"], tensors["thresholds"], tensors["means"],
            gate=tensors.get("gate"), reliable=tensors.get("reliable"),
            meta=ConceptMeta(
                header.get("sae_fingerprint"), header.get("hook_point"), header.get("model_family"),
                dict(header.get("prompts") or {}), dict(header.get("selection") or {}),
                {**dict(header.get("extra") or {}), "source": path},
            ),
        )
    except ConceptFileError as e:
        raise ConceptFileError(f"{path}: {e}") from e
    if d.gate is None:
        logger.info("%s: no presence gate (format version %s); the gate is off for it. Learn the concept again "
                    "to get one", path, header.get("format_version"))
    if sae is not None and d.meta.sae_fingerprint is None:
        raise ConceptMismatchError(
            f"{path}: records no SAE fingerprint (sae_fingerprint is null), so it cannot be checked against "
            f"{getattr(sae, 'source', None) or 'the given SAE'}; learn the concept again with this SAE, or load it "
            "without an SAE connected if you are sure it belongs to it"
        )
    if sae is not None:
        d.check_compatible(sae, source=path)
    return d
