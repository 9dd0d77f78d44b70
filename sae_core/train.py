"""TopK SAE training on collected activations: FVU loss, AuxK revival of dead latents, unit-norm decoder rows."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import SAEConfig
from .errors import SAEInputError
from .sae import SparseAutoencoder
from .trainer import StreamConfig, train_stream

# the README names the streaming trainer by this path
__all__ = ["StreamConfig", "TrainConfig", "TrainResult", "auxk_loss", "fraction_of_variance_unexplained", "train_sae",
           "train_stream"]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """How to train a TopK SAE (ReLU then TopK, as sparsify and SAeUron do)."""

    n_latents: int
    """Dictionary size M."""
    k: int
    """Latents kept per patch."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 1024
    """Activation rows per step."""
    lr: float | None = None
    """Adam learning rate; None picks sparsify's rule 2e-4 / sqrt(M / 2**14)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss that lets dead latents reconstruct the residual error."""
    dead_after_tokens: int = 200_000
    """A latent that has not fired for this many rows counts as dead."""
    seed: int = 0
    log_every: int = 100
    """Log (and call the callback) every this many steps."""

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.n_latents:
            raise SAEInputError(f"TrainConfig.k: expected 1..{self.n_latents}, found {self.k}")
        if self.steps <= 0 or self.batch_size <= 0:
            raise SAEInputError(f"TrainConfig: steps and batch_size must be positive, found {self.steps}, {self.batch_size}")

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2**14)


class TrainResult(NamedTuple):
    sae: SparseAutoencoder
    log: list[dict[str, float]]
    """One entry per log_every steps: step, fvu, auxk, dead_fraction."""


@dataclass
class _State:
    since_fired: Tensor
    log: list[dict[str, float]] = field(default_factory=list)


def _init(acts: Tensor, cfg: TrainConfig, g: torch.Generator) -> dict[str, Tensor]:
    d = acts.shape[-1]
    W = torch.empty(cfg.n_latents, d)
    bound = 1 / math.sqrt(d)
    W.uniform_(-bound, bound, generator=g)
    W_dec = W / W.norm(dim=-1, keepdim=True)
    # Tied init (sparsify, OpenAI): the encoder starts as the decoder; b_dec at the data mean.
    return {"W_enc": W_dec.clone(), "b_enc": torch.zeros(cfg.n_latents), "W_dec": W_dec.clone(),
            "b_dec": acts.mean(0).float()}


def _remove_parallel_grad(W_dec: Tensor) -> None:
    """Keep decoder rows on the unit sphere: drop the gradient component along each row."""
    if W_dec.grad is not None:
        parallel = (W_dec.grad * W_dec.data).sum(-1, keepdim=True)
        W_dec.grad -= parallel * W_dec.data


def auxk_loss(pre: Tensor, dead: Tensor, err: Tensor, W_dec: Tensor, k_aux: int, total_var: Tensor) -> Tensor:
    """AuxK (Gao et al.): the top k_aux dead latents (by pre-activation, then ReLU) reconstruct the error
    ``err`` [N, d] that the live ones left; scaled by min(n_dead / k_aux, 1) and normalised like the FVU."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    ka = min(k_aux, n_dead)
    aux_pre = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    values, indices = torch.topk(aux_pre, ka, dim=-1, sorted=False)
    e_hat = F.embedding_bag(indices, W_dec, per_sample_weights=F.relu(values), mode="sum")
    return min(n_dead / k_aux, 1.0) * (e_hat - err.detach()).pow(2).sum(-1).mean() / total_var


def train_sae(
    acts: Tensor,
    cfg: TrainConfig,
    *,
    sae_config: dict[str, Any] | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a ReLU-TopK SAE on ``acts`` [N, d] (rows sampled with replacement, seeded).

    ``sae_config`` adds SAEConfig fields (hook_point, model_family, input_space, provenance).
    """
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise SAEInputError(f"train_sae: expected activations [N, d] with N >= 2, found shape {tuple(acts.shape)}")
    if not bool(torch.isfinite(acts).all()):
        raise SAEInputError("train_sae: activations hold NaN/inf; collect them again")
    acts = acts.float()
    g = torch.Generator().manual_seed(cfg.seed)
    d = acts.shape[-1]
    extra = dict(sae_config or {})
    provenance = {"trained_with": "sae_core.train", "train_config": asdict(cfg), **extra.pop("provenance", {})}
    sae_cfg = SAEConfig(d_in=d, n_latents=cfg.n_latents, k=cfg.k, activation="relu_topk",
                        provenance=provenance, **extra)
    sae = SparseAutoencoder(sae_cfg, **_init(acts, cfg, g), source="<training>")
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.learning_rate(), eps=6.25e-10)
    state = _State(since_fired=torch.zeros(cfg.n_latents, dtype=torch.long))
    k_aux = max(1, d // 2)
    total_var = (acts - acts.mean(0)).pow(2).sum(-1).mean()

    for step in range(1, cfg.steps + 1):
        x = acts[torch.randint(acts.shape[0], (cfg.batch_size,), generator=g)]
        pre = sae.pre_acts(x)
        values, indices = torch.topk(F.relu(pre), cfg.k, dim=-1, sorted=False)
        x_hat = sae.decode_topk(values, indices)
        err = x - x_hat
        fvu = err.pow(2).sum(-1).mean() / total_var

        fired = torch.zeros(cfg.n_latents, dtype=torch.bool)
        fired[indices[values > 0]] = True
        state.since_fired += cfg.batch_size
        state.since_fired[fired] = 0
        dead = state.since_fired > cfg.dead_after_tokens
        n_dead = int(dead.sum())
        auxk = auxk_loss(pre, dead, err, sae.W_dec, k_aux, total_var) if cfg.auxk_alpha > 0 else x.new_zeros(())
        loss = fvu + cfg.auxk_alpha * auxk
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _remove_parallel_grad(sae.W_dec)
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

        if step % cfg.log_every == 0 or step == cfg.steps:
            entry = {"step": step, "fvu": float(fvu.detach()), "auxk": float(auxk.detach()),
                     "dead_fraction": n_dead / cfg.n_latents}
            state.log.append(entry)
            logger.info("step %d fvu %.4f auxk %.4f dead %.3f", step, entry["fvu"], entry["auxk"],
                        entry["dead_fraction"])
            if callback is not None:
                callback(step, entry)

    for p in params:
        p.requires_grad_(False)
    sae.clear_cache()
    sae.source = "<trained>"
    return TrainResult(sae, state.log)


@torch.no_grad()
def fraction_of_variance_unexplained(sae: SparseAutoencoder, acts: Tensor, batch: int = 4096) -> float:
    """FVU of ``sae`` on ``acts`` [N, d]: sum ||x - x_hat||^2 / sum ||x - mean||^2."""
    acts = acts.float()
    mean = acts.mean(0)
    num = den = 0.0
    for i in range(0, acts.shape[0], batch):
        x = acts[i:i + batch]
        num += float((x - sae(x).x_hat).pow(2).sum())
        den += float((x - mean).pow(2).sum())
    return num / den
