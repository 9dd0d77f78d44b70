"""Concept statistics: the per-(concept, timestep) mean codes and firing rates gathered while sampling."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .errors import SAEInputError


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

    def __init__(self, n_latents: int, fire_above: float = 0.0, keep_samples: bool = False, sample_top: int = 64):
        """``fire_above``: a latent counts as active (firing rates, rule "specific") where its code exceeds this;
        0 for ReLU-style SAEs, 0.5 = sigmoid(0) for Sigmoid(TopK) ones (``SparseAutoencoder.firing_level``), whose
        every kept latent is > 0. ``keep_samples``: also keep every image's top ``sample_top`` codes per step
        (see ``add``) for the presence gate."""
        if int(n_latents) < 1:
            raise SAEInputError(f"ConceptStatsAccumulator: n_latents is {n_latents}, expected >= 1")
        self.n_latents = int(n_latents)
        # Per-image codes for the presence gate (sae_core.gate): the sample_top largest codes of every patch
        # (exact for TopK SAEs with k <= sample_top), fp16 values and int32 ids, about 6 bytes x sample_top per
        # patch and step.
        self.keep_samples = bool(keep_samples)
        self.sample_top = int(sample_top)
        self.samples: dict[tuple[str, object, int], dict[float, tuple[Tensor, Tensor]]] = {}
        self.fire_above = float(fire_above)
        self._sums: dict[str, dict[float, Tensor]] = {}
        self._fires: dict[str, dict[float, Tensor]] = {}
        self._counts: dict[str, dict[float, int]] = {}

    def add(self, concept: str, timestep: float, codes: Tensor, sample=None) -> None:
        """Add codes [..., M] (every leading position counts as one row) for one concept and step.

        With ``keep_samples`` and a ``sample`` id (one per sampling run, e.g. the prompt's index), codes
        [B, H, W, M] are also kept per image (sample, b) for the presence gate."""
        if codes.shape[-1] != self.n_latents:
            raise SAEInputError(
                f"ConceptStatsAccumulator.add({concept!r}): codes have {codes.shape[-1]} latents, "
                f"expected {self.n_latents}; feed codes of the SAE this accumulator was made for"
            )
        key = round(float(timestep), 3)
        if self.keep_samples and sample is not None:
            self._keep(concept, sample, key, codes)
        rows = codes.reshape(-1, self.n_latents)
        s = rows.sum(0, dtype=torch.float32 if rows.device.type == "mps" else torch.float64)
        s = s.detach().to("cpu", torch.float64)
        f = (rows > self.fire_above).sum(0).detach().to("cpu", torch.float64)
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

    def _keep(self, concept: str, sample, key: float, codes: Tensor) -> None:
        if codes.ndim != 4:
            raise ValueError(f"ConceptStatsAccumulator.add({concept!r}): per-image codes must be [B, H, W, M], got "
                             f"{tuple(codes.shape)}")
        top = min(self.sample_top, self.n_latents)
        vals, ids = codes.detach().topk(top, dim=-1)
        vals, ids = vals.to("cpu", torch.float16), ids.to("cpu", torch.int32)
        for b in range(codes.shape[0]):
            self.samples.setdefault((concept, sample, b), {})[key] = (vals[b].clone(), ids[b].clone())

    def sample_rates(self, keys, timesteps: Tensor) -> Tensor:
        """[T, M] float64: the firing rates (share of patches where a latent's code exceeds ``fire_above``) over the
        kept images ``keys`` (keys of ``samples``) at ``timesteps`` [T], each image weighted by its patches, as the
        rates of ``stats``. Exact for TopK SAEs with k <= sample_top; otherwise latents outside a patch's top
        ``sample_top`` codes count as silent there."""
        keys = list(keys)
        if not keys:
            raise SAEInputError("ConceptStatsAccumulator.sample_rates: no images given (an empty contrast group)")
        out = torch.zeros(len(timesteps), self.n_latents, dtype=torch.float64)
        rows = torch.zeros(len(timesteps), 1, dtype=torch.float64)
        for key in keys:
            per_t = self.samples.get(key)
            if per_t is None:
                raise SAEInputError(f"ConceptStatsAccumulator.sample_rates: no kept image {key!r}; keys are "
                                    "(label, sample, image) as recorded with keep_samples=True")
            for t, ts in enumerate(timesteps.tolist()):
                hit = per_t.get(round(float(ts), 3))
                if hit is None:
                    raise SAEInputError(f"ConceptStatsAccumulator.sample_rates: image {key!r} has no codes at timestep "
                                        f"{ts}; sample every prompt with the same sampler and steps")
                vals, ids = hit
                fired = ids[vals.float() > self.fire_above].long()
                out[t].index_add_(0, fired, torch.ones(fired.numel(), dtype=torch.float64))
                rows[t] += vals.shape[:-1].numel()
        return out / rows

    def group_rates(self, groups, timesteps: Tensor) -> Tensor:
        """[G, T, M] float64: ``sample_rates`` of each group of kept-image keys (the hard negatives of the
        "specific" rule, ``build_concept_dictionary(negatives=...)``); [0, T, M] when there is no group."""
        rates = [self.sample_rates(keys, timesteps) for keys in groups]
        return torch.stack(rates) if rates else torch.zeros(0, len(timesteps), self.n_latents, dtype=torch.float64)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._sums)

    def stats(self) -> ConceptStats:
        if len(self._sums) < 2:
            raise SAEInputError(
                f"ConceptStatsAccumulator: have concepts {list(self._sums)}, need at least 2 "
                "(a concept and a contrast set) to compute SAeUron scores"
            )
        names = tuple(self._sums)
        keys = sorted(self._sums[names[0]], reverse=True)
        for n in names[1:]:
            if set(self._sums[n]) != set(keys):
                missing = sorted(set(keys) ^ set(self._sums[n]))
                raise SAEInputError(
                    f"ConceptStatsAccumulator: concept {n!r} was recorded at other timesteps than {names[0]!r} "
                    f"(differing: {missing[:8]}); sample every concept with the same sampler and steps"
                )
        sums = torch.stack([torch.stack([self._sums[n][k] for k in keys]) for n in names])
        fires = torch.stack([torch.stack([self._fires[n][k] for k in keys]) for n in names])
        counts = torch.tensor([[float(self._counts[n][k]) for k in keys] for n in names], dtype=torch.float64)
        return ConceptStats(names, torch.tensor(keys, dtype=torch.float64), sums / counts[..., None], counts,
                            fires / counts[..., None])

