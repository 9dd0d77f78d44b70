"""Streaming, checkpointed, data-parallel TopK SAE training on a dataset folder (sae_core.dataset): BatchPlan
(which rows each step reads), SAETrainer (one optimiser step), checkpoints, train_stream (the loop)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import SAEConfig
from .errors import SAEConfigError, SAEFormatError
from .files import atomic_write
from .sae import SparseAutoencoder

logger = logging.getLogger(__name__)


@dataclass
class StreamConfig:
    """How to train a ReLU-TopK SAE from a dataset folder; the same on one process or under torchrun."""

    n_latents: int
    """Dictionary size M."""
    k: int
    """Latents kept per patch."""
    steps: int = 10_000
    """Optimizer steps (each one global batch)."""
    batch_size: int = 4096
    """Rows per step over all processes; every process takes batch_size / world_size of them."""
    lr: float | None = None
    """Adam learning rate; None picks sparsify's rule 2e-4 / sqrt(M / 2**14)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss."""
    k_aux: int | None = None
    """Dead latents used by AuxK; None = d / 2 (Gao et al.)."""
    dead_after_tokens: int = 200_000
    """A latent that has not fired for this many rows counts as dead."""
    seed: int = 0
    """Seeds the initialisation, the shard order and the in-buffer shuffle."""
    holdout_shards: int = 1
    """Last shards of the dataset kept out of training and evaluated at the end (0 = none)."""
    buffer_shards: int = 4
    """Shards loaded and shuffled together; rows left over after the last full batch of a buffer are skipped."""
    log_every: int = 100
    checkpoint_every: int = 500
    """Write a checkpoint every this many steps (0 = only at the end or when stopped)."""
    amp: str = "auto"
    """auto: bfloat16 autocast on CUDA where supported, float32 elsewhere; off: always float32."""

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.n_latents:
            raise SAEConfigError(f"StreamConfig.k: expected 1..{self.n_latents}, found {self.k}")
        for name in ("steps", "batch_size", "buffer_shards", "log_every"):
            if getattr(self, name) < 1:
                raise SAEConfigError(f"StreamConfig.{name}: expected >= 1, found {getattr(self, name)}")
        if self.holdout_shards < 0 or self.checkpoint_every < 0:
            raise SAEConfigError("StreamConfig.holdout_shards and checkpoint_every: expected >= 0")
        if self.amp not in ("auto", "off"):
            raise SAEConfigError(f"StreamConfig.amp: expected 'auto' or 'off', found {self.amp!r}")

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2**14)


# Fields that must not change between a checkpoint and its resumption (steps may grow).
_RESUME_FIXED = ("n_latents", "k", "batch_size", "lr", "auxk_alpha", "k_aux", "dead_after_tokens", "seed",
                 "holdout_shards", "buffer_shards")


def _mix(*parts: int) -> int:
    """A seed from several integers, stable across runs and platforms."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class BatchPlan:
    """Which rows make global batch ``s``: a pure function of (dataset, seed, batch size, buffer size, s).

    Epoch e visits the training shards in a seeded order; consecutive groups of ``buffer_shards`` shards are
    loaded together and their rows shuffled (seeded by e and the group); batches are cut from the shuffled rows.
    Being indexable, a resumed run continues exactly where a checkpoint left off.
    """

    def __init__(self, rows: Sequence[int], shard_ids: Sequence[int], batch_size: int, buffer_shards: int, seed: int):
        self.rows, self.ids = list(rows), list(shard_ids)
        self.B, self.G, self.seed = batch_size, buffer_shards, seed
        self._epochs: dict[int, list[tuple[list[int], int]]] = {}
        if sum(self.rows[i] for i in self.ids) < batch_size:
            raise SAEConfigError(
                f"batch_size {batch_size} is larger than the {sum(self.rows[i] for i in self.ids)} training rows; "
                "collect more activations or lower the batch size"
            )

    def groups(self, epoch: int) -> list[tuple[list[int], int]]:
        """[(shard ids of the group, batches in it)] of an epoch."""
        if epoch not in self._epochs:
            g = torch.Generator().manual_seed(_mix(self.seed, 1, epoch))
            order = [self.ids[i] for i in torch.randperm(len(self.ids), generator=g).tolist()]
            groups = [order[i:i + self.G] for i in range(0, len(order), self.G)]
            self._epochs[epoch] = [(grp, sum(self.rows[i] for i in grp) // self.B) for grp in groups]
            if not any(n for _, n in self._epochs[epoch]):
                raise SAEConfigError(
                    f"no buffer of {self.G} shards holds a full batch of {self.B} rows; raise buffer_shards or lower "
                    "the batch size"
                )
        return self._epochs[epoch]

    def locate(self, step: int) -> tuple[int, int, int]:
        """(epoch, group, batch within the group) of 0-based global batch ``step``."""
        epoch = 0
        while True:
            for gi, (_, n) in enumerate(self.groups(epoch)):
                if step < n:
                    return epoch, gi, step
                step -= n
            epoch += 1

    def permutation(self, epoch: int, group: int, n_rows: int) -> Tensor:
        return torch.randperm(n_rows, generator=torch.Generator().manual_seed(_mix(self.seed, 2, epoch, group)))


class _Dist(NamedTuple):
    world: int
    rank: int
    on: bool


def _dist_setup(device: torch.device) -> _Dist:
    """torch.distributed from torchrun's environment (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(1, 0, False)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # one GPU per process (LOCAL_RANK), before nccl binds to one
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_world_size(), dist.get_rank(), True)


class StreamResult(NamedTuple):
    sae: SparseAutoencoder
    log: list[dict[str, float]]
    """One entry per log_every steps: step, fvu, l0, dead_fraction, auxk, rows_per_s."""
    step: int
    """Steps done (== cfg.steps when finished)."""
    finished: bool
    holdout: dict[str, float] | None
    """FVU, L0 and dead share on the held-out shards (None when there are none)."""


class TopKEncode(torch.autograd.Function):
    """ReLU-TopK encoder with a sparse backward: (x_c [N, d], W_enc [M, d], b_enc [M]) -> kept (values, indices)
    and, for AuxK, the ReLU'd top-``ka`` pre-activations among ``dead_ids`` (values, indices into all M latents).

    Only the kept entries of the pre-activations get a gradient, so the backward needs no dense [N, M] product:
    dW_enc = S^T x_c with S the sparse [N, M] gradient (N x (k + ka) entries), dx_c = S W_enc as a gather.
    This makes a training step cost about one dense GEMM (the forward) instead of three.
    """

    @staticmethod
    def forward(ctx, x_c, W_enc, b_enc, k: int, dead_ids, ka: int, amp: bool):
        with torch.autocast(x_c.device.type, dtype=torch.bfloat16, enabled=amp):
            pre = F.linear(x_c, W_enc, b_enc)
        pre = pre.float().relu_() if amp else pre.relu_()
        values, indices = torch.topk(pre, k, dim=-1, sorted=False)
        if ka:
            av, local = torch.topk(pre.index_select(1, dead_ids), ka, dim=-1, sorted=False)
            ai = dead_ids[local]
        else:
            av = pre.new_zeros(pre.shape[0], 0)
            ai = indices.new_zeros(pre.shape[0], 0)
        ctx.save_for_backward(x_c, W_enc, torch.cat([indices, ai], 1), torch.cat([values, av], 1))
        ctx.mark_non_differentiable(indices, ai)
        return values, indices, av, ai

    @staticmethod
    def backward(ctx, g_values, g_indices, g_av, g_ai):
        x_c, W_enc, idx, kept = ctx.saved_tensors
        g = torch.cat([g_values, g_av], 1) if g_av is not None and g_av.numel() else g_values
        if g.shape[1] < idx.shape[1]:  # the AuxK outputs were not used
            g = torch.cat([g, g.new_zeros(g.shape[0], idx.shape[1] - g.shape[1])], 1)
        g = g * (kept > 0)  # ReLU
        n, m = x_c.shape[0], W_enc.shape[0]
        rows = torch.arange(n, device=x_c.device).repeat_interleave(idx.shape[1])
        S_t = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), g.reshape(-1), (m, n),
                                      check_invariants=False)
        g_W = torch.sparse.mm(S_t.coalesce(), x_c)
        g_b = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        g_x = F.embedding_bag(idx, W_enc, per_sample_weights=g.to(W_enc.dtype), mode="sum")
        return g_x, g_W, g_b, None, None, None, None


class SAETrainer:
    """The parameters, optimiser and dead-latent counters of one run, and one update step.

    ``step(x_local, global_rows)`` takes this process's rows; the loss of every process is normalised by the
    global batch, so summing the gradients over processes gives exactly the one-process gradient.
    """

    def __init__(self, d: int, cfg: StreamConfig, mean: Tensor, total_var: float, device: torch.device,
                 dist: _Dist | None = None):
        self.cfg, self.d, self.device, self.dist = cfg, d, device, dist or _Dist(1, 0, False)
        g = torch.Generator().manual_seed(cfg.seed)
        W = torch.empty(cfg.n_latents, d).uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d), generator=g)
        W_dec = W / W.norm(dim=-1, keepdim=True)
        self.params = {"W_enc": W_dec.clone(), "b_enc": torch.zeros(cfg.n_latents), "W_dec": W_dec.clone(),
                       "b_dec": mean.float().clone()}
        self.params = {n: p.to(device).requires_grad_(True) for n, p in self.params.items()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=cfg.learning_rate(), eps=6.25e-10)
        self.since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)
        self.total_var = float(total_var)
        self.k_aux = cfg.k_aux or max(1, d // 2)
        self.amp = (cfg.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())

    # -- the math (Gao et al. 2024) --

    def losses(self, x: Tensor, global_rows: int, dead: Tensor) -> dict[str, Tensor]:
        """Sums over the local rows divided by (global rows x total variance): fvu, auxk; and l0, fired."""
        p = self.params
        n_dead = int(dead.sum())
        use_aux = n_dead > 0 and self.cfg.auxk_alpha > 0
        ka = min(self.k_aux, n_dead) if use_aux else 0
        dead_ids = dead.nonzero().flatten() if use_aux else None
        values, indices, av, ai = TopKEncode.apply(x - p["b_dec"], p["W_enc"], p["b_enc"], self.cfg.k, dead_ids, ka,
                                                   self.amp)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            x_hat = F.embedding_bag(indices, p["W_dec"], per_sample_weights=values, mode="sum")
        x_hat = x_hat.float() + p["b_dec"]
        err = x - x_hat
        norm = global_rows * self.total_var
        fvu = err.pow(2).sum() / norm
        if use_aux:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                e_hat = F.embedding_bag(ai, p["W_dec"], per_sample_weights=av, mode="sum")
            auxk = min(n_dead / self.k_aux, 1.0) * (e_hat.float() - err.detach()).pow(2).sum() / norm
        else:
            auxk = fvu.new_zeros(())
        fired = torch.zeros(self.cfg.n_latents, dtype=torch.long, device=x.device)
        fired[indices[values > 0]] = 1
        return {"fvu": fvu, "auxk": auxk, "l0": (values > 0).sum(), "fired": fired}

    def step(self, x: Tensor, global_rows: int, want_metrics: bool = False) -> dict[str, float] | None:
        import torch.distributed as tdist

        x = x.to(self.device, torch.float32, non_blocking=True)
        dead = self.since_fired > self.cfg.dead_after_tokens
        out = self.losses(x, global_rows, dead)
        loss = out["fvu"] + self.cfg.auxk_alpha * out["auxk"]
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        params = list(self.params.values())
        fired = out["fired"]
        if self.dist.on:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            tdist.all_reduce(flat)
            i = 0
            for p in params:
                p.grad.copy_(flat[i:i + p.numel()].view_as(p))
                i += p.numel()
            tdist.all_reduce(fired, op=tdist.ReduceOp.MAX)
        W_dec = self.params["W_dec"]
        # unit-norm decoder rows: drop the gradient along each row, step, renormalise (same on every rank)
        W_dec.grad -= (W_dec.grad * W_dec.data).sum(-1, keepdim=True) * W_dec.data
        self.opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.since_fired += global_rows
        self.since_fired[fired.bool()] = 0
        if not want_metrics:
            return None
        m = torch.stack([out["fvu"].detach(), out["auxk"].detach(), out["l0"].float()])
        if self.dist.on:
            tdist.all_reduce(m)
        return {"fvu": float(m[0]), "auxk": float(m[1]), "l0": float(m[2]) / global_rows,
                "dead_fraction": float(dead.float().mean())}

    # -- state --

    def state(self, step: int, log: list) -> dict[str, Any]:
        return {"step": step, "params": {n: p.detach().cpu() for n, p in self.params.items()},
                "opt": self.opt.state_dict(), "since_fired": self.since_fired.cpu(), "total_var": self.total_var,
                "log": list(log), "config": asdict(self.cfg)}

    def load_state(self, st: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(st["params"][n])
        self.opt.load_state_dict(st["opt"])
        self.since_fired.copy_(st["since_fired"])
        self.total_var = float(st["total_var"])

    def sae(self, sae_config: Mapping[str, Any] | None = None) -> SparseAutoencoder:
        extra = dict(sae_config or {})
        cfg = SAEConfig(d_in=self.d, n_latents=self.cfg.n_latents, k=self.cfg.k, activation="relu_topk", **extra)
        return SparseAutoencoder(cfg, **{n: p.detach().float().cpu().clone() for n, p in self.params.items()},
                                 source="<trained>")


CHECKPOINT = "checkpoint.pt"


def save_checkpoint(folder: Path, state: Mapping[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write(folder / CHECKPOINT, lambda tmp: torch.save(dict(state), tmp), what="training checkpoint")


def load_checkpoint(folder: Path, cfg: StreamConfig) -> dict[str, Any]:
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        raise SAEFormatError(f"{path}: no checkpoint to resume from; start without resume")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files
        raise SAEFormatError(f"{path}: not a readable training checkpoint ({e}); start without resume") from e
    saved = st.get("config", {})
    for key in _RESUME_FIXED:
        if saved.get(key) != getattr(cfg, key):
            raise SAEConfigError(
                f"{path}: the checkpoint was trained with {key}={saved.get(key)!r}, this run asks for "
                f"{getattr(cfg, key)!r}; use the same settings to resume, or a new checkpoint folder"
            )
    if st["step"] > cfg.steps:
        raise SAEConfigError(f"{path}: the checkpoint is at step {st['step']}, past the {cfg.steps} steps asked for")
    return st


@torch.no_grad()
def evaluate_rows(sae: SparseAutoencoder, chunks, batch: int = 8192) -> dict[str, float]:
    """FVU (against the rows' own mean), mean L0 and the share of latents that never fire, over row chunks [n, d]."""
    s = sq = None
    n = 0
    err = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    for rows in chunks:
        for i in range(0, rows.shape[0], batch):
            x = rows[i:i + batch].float()
            codes = sae.encode_topk(x)
            x_hat = sae.decode_topk(codes.values, codes.indices)
            err += float((x - x_hat).double().pow(2).sum())
            live = codes.values > 0
            l0 += float(live.sum())
            fired[codes.indices[live]] = True
            xd = x.double()
            s = xd.sum(0) if s is None else s + xd.sum(0)
            sq = xd.pow(2).sum(0) if sq is None else sq + xd.pow(2).sum(0)
            n += x.shape[0]
    total = float((sq - s.pow(2) / n).sum())
    return {"fvu": err / total, "l0": l0 / n, "dead_fraction": 1 - float(fired.float().mean()), "rows": n}


def train_stream(
    dataset,
    cfg: StreamConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_seconds: float | None = None,
    sae_config: Mapping[str, Any] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> StreamResult:
    """Train on an ``ActivationDataset`` (or its folder), streaming shards; data-parallel when launched by torchrun.

    Checkpoints go to ``checkpoint_dir`` every ``cfg.checkpoint_every`` steps and when stopped (``should_stop()``
    true, ``max_seconds`` spent, or KeyboardInterrupt, which is re-raised after the checkpoint is written);
    ``on_step(step)`` is called after every step (progress bars);
    ``resume`` continues from it and gives the same result as an uninterrupted run. Only rank 0 writes.
    """
    import time

    from .dataset import ActivationDataset

    ds = dataset if isinstance(dataset, ActivationDataset) else ActivationDataset.open(dataset)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        import os

        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dist = _dist_setup(dev)
    if cfg.batch_size % dist.world:
        raise SAEConfigError(f"batch_size {cfg.batch_size} does not split over {dist.world} processes; use a multiple")
    n = len(ds.shards)
    if cfg.holdout_shards >= n:
        raise SAEConfigError(
            f"{ds.folder}: {n} shard(s), {cfg.holdout_shards} held out leaves none to train on; collect more or lower "
            "holdout_shards (or the collection's shard size)"
        )
    train_ids = list(range(n - cfg.holdout_shards))
    hold_ids = list(range(n - cfg.holdout_shards, n))
    plan = BatchPlan([ds.rows(i) for i in range(n)], train_ids, cfg.batch_size, cfg.buffer_shards, cfg.seed)
    mean, total_var, _ = ds.moments(train_ids)
    trainer = SAETrainer(ds.d_in, cfg, mean, total_var, dev, dist)
    log: list[dict[str, float]] = []
    start = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume:
        if ckpt is None:
            raise SAEConfigError("resume needs a checkpoint folder")
        st = load_checkpoint(ckpt, cfg)
        trainer.load_state(st)
        log, start = list(st["log"]), int(st["step"])
        logger.info("resumed from %s at step %d", ckpt / CHECKPOINT, start)

    local = cfg.batch_size // dist.world
    lo, hi = dist.rank * local, (dist.rank + 1) * local
    loaded: tuple[int, int] | None = None
    buf = perm = None
    t0 = time.time()
    t_log, rows_since = t0, 0
    step = start

    def checkpoint() -> None:
        if ckpt is not None and dist.rank == 0:
            save_checkpoint(ckpt, trainer.state(step, log))

    try:
        while step < cfg.steps:
            if (should_stop is not None and should_stop()) or (max_seconds is not None and time.time() - t0 > max_seconds):
                break
            epoch, gi, bi = plan.locate(step)
            if loaded != (epoch, gi):
                shards, _ = plan.groups(epoch)[gi]
                buf = torch.cat([ds.load(i) for i in shards])
                perm = plan.permutation(epoch, gi, buf.shape[0])
                loaded = (epoch, gi)
            rows = perm[bi * cfg.batch_size + lo: bi * cfg.batch_size + hi]
            step += 1
            want = step % cfg.log_every == 0 or step == cfg.steps
            m = trainer.step(buf[rows], cfg.batch_size, want_metrics=want)
            rows_since += cfg.batch_size
            if on_step is not None:
                on_step(step)
            if m is not None:
                now = time.time()
                m = {"step": step, **m, "rows_per_s": rows_since / max(now - t_log, 1e-9)}
                t_log, rows_since = now, 0
                log.append(m)
                logger.info("step %d fvu %.4f l0 %.2f dead %.3f auxk %.4f", step, m["fvu"], m["l0"],
                            m["dead_fraction"], m["auxk"])
                if callback is not None and dist.rank == 0:
                    callback(step, m)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise
    checkpoint()
    finished = step >= cfg.steps
    extra = dict(sae_config or {})
    provenance = {"trained_with": "sae_core.train.train_stream", "train_config": asdict(cfg), "steps_done": step,
                  "finished": finished, "world_size": dist.world, "torch": torch.__version__,
                  **extra.pop("provenance", {})}
    sae = trainer.sae({**extra, "provenance": provenance})
    holdout = None
    if hold_ids and finished and dist.rank == 0:
        holdout = evaluate_rows(sae, (ds.load(i) for i in hold_ids))
        sae.cfg.provenance["holdout"] = holdout
        logger.info("held-out (%d rows): fvu %.4f l0 %.2f dead %.3f", holdout["rows"], holdout["fvu"], holdout["l0"],
                    holdout["dead_fraction"])
    return StreamResult(sae, log, step, finished, holdout)
