"""Train the shapes-world model on freshly drawn scenes; periodic, resumable checkpoints.

    python -m shapes_world.train --out RUN --steps 8000 --threads 1 --seed 0 --max-minutes 75

Writes OUT/latest/{model.safetensors (EMA weights), config.json, train_state.pt (raw weights +
optimizer, for --resume)}, snapshots OUT/step_NNNNNN/ (EMA weights + config), and OUT/log.jsonl with
one line per --log-every steps. Re-running with the same OUT resumes from OUT/latest.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .model import ModelConfig, ShapesModel, count_parameters, save_model
from .scenes import generate_scenes
from .text import TextEncoderConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 3000  # length of the lr schedule and the last step
    batch: int = 32
    lr: float = 1e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    ema: float = 0.999
    cond_drop: float = 0.1  # share of captions replaced by "" so CFG has an unconditional branch
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (0 disables)
    # Offset noise: std of a per-image, per-channel constant added to the noise. The scaled_linear
    # schedule leaks sqrt(alphas_cumprod[999]) = 0.07 of the image into x_999, and in pixel space the
    # image mean (the background) is readable from it: a model trained without offset takes the
    # background from the (zero-mean) starting noise, so black and white backgrounds come out grey.
    offset_noise: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


def lr_at(step: int, tc: TrainConfig, time_frac: float = 0.0) -> float:
    """Linear warmup then cosine decay to min_lr_frac * lr.

    The decay ends at tc.steps or, when a time budget is set, at time_frac = elapsed / budget = 1,
    whichever comes first, so a run cut short by --max-minutes still ends on a low learning rate.
    """
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    p = min(1.0, max((step - tc.warmup) / max(1, tc.steps - tc.warmup), time_frac))
    return tc.lr * (tc.min_lr_frac + (1 - tc.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def make_batch(step: int, tc: TrainConfig, size: int) -> tuple[torch.Tensor, list[str], torch.Generator]:
    """Images in [-1, 1] and captions for one step; a pure function of (seed, step) so resumes replay."""
    gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
    scenes = generate_scenes(tc.batch, seed=int(torch.randint(2**62, (1,), generator=gen)), size=size)
    drop = torch.rand(tc.batch, generator=gen) < tc.cond_drop
    captions = ["" if d else c for d, c in zip(drop.tolist(), scenes.captions, strict=True)]
    return scenes.images * 2 - 1, captions, gen


def loss_on_batch(
    model: ShapesModel, scheduler, x0: torch.Tensor, captions: list[str], gen: torch.Generator,
    min_snr_gamma: float = 0.0, offset_noise: float = 0.0,
) -> torch.Tensor:
    """Epsilon-prediction loss at uniform random timesteps (Min-SNR weighted when gamma > 0)."""
    b = x0.shape[0]
    t = torch.randint(scheduler.config.num_train_timesteps, (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn((b, x0.shape[1], 1, 1), generator=gen)
    x_t = scheduler.add_noise(x0, noise, t)
    pred = model(x_t, t, model.encode_text(captions))
    per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        ab = scheduler.alphas_cumprod[t]
        snr = ab / (1 - ab)
        per = per * torch.clamp(snr, max=min_snr_gamma) / snr
    return per.mean()


def _ema_update(ema: dict[str, torch.Tensor], model: ShapesModel, decay: float) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v, alpha=1 - decay)
            else:
                ema[k].copy_(v)


def train(out: Path, mc: ModelConfig, tc: TrainConfig, max_minutes: float | None, log_every: int,
          save_minutes: float, snapshot_every: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    model = ShapesModel(mc)
    scheduler = model.train_scheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step = 0
    elapsed_before = 0.0  # training seconds of earlier runs of this --out (resume)
    state_path = out / "latest" / "train_state.pt"
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        saved_mc = json.loads((out / "latest" / "config.json").read_text())["model"]
        if saved_mc != mc.to_dict():
            raise ValueError(
                f"{out / 'latest'}: saved model config {saved_mc} differs from the requested {mc.to_dict()}; "
                "use another --out or the same model options"
            )
        model.load_state_dict(state["model"])
        ema = state["ema"]
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        logger.info("resumed from %s at step %d", state_path, step)
    n_params = count_parameters(model)
    logger.info("params: unet %d, text %d, total %d", count_parameters(model.unet),
                count_parameters(model.text), n_params)

    def checkpoint(snapshot: bool) -> None:
        meta = {"step": step, "train": tc.__dict__, "params": n_params, "weights": "ema"}
        save_model(model, out / "latest", meta, state_dict=ema)
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema, "optimizer": opt.state_dict(), "step": step,
                    "elapsed_s": elapsed_before + time.monotonic() - t_start}, tmp)
        tmp.replace(state_path)
        if snapshot:
            save_model(model, out / f"step_{step:06d}", meta, state_dict=ema)
        logger.info("saved checkpoint at step %d%s", step, " (+snapshot)" if snapshot else "")

    t_start = time.monotonic()
    last_save = t_start
    window, t_window = [], time.monotonic()
    log_file = (out / "log.jsonl").open("a")
    model.train()
    while step < tc.steps:
        elapsed_min = (elapsed_before + time.monotonic() - t_start) / 60
        time_frac = elapsed_min / max_minutes if max_minutes else 0.0
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc, time_frac)
        x0, captions, gen = make_batch(step, tc, mc.sample_size)
        loss = loss_on_batch(model, scheduler, x0, captions, gen, tc.min_snr_gamma, tc.offset_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        _ema_update(ema, model, min(tc.ema, (1 + step) / (10 + step)))
        window.append(loss.item())
        if step % log_every == 0:
            now = time.monotonic()
            rec = {"step": step, "loss": sum(window) / len(window), "lr": opt.param_groups[0]["lr"],
                   "s_per_step": (now - t_window) / len(window),
                   "elapsed_min": (elapsed_before + now - t_start) / 60}
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            logger.info("step %d loss %.4f lr %.2e %.2f s/step", step, rec["loss"], rec["lr"], rec["s_per_step"])
            window, t_window = [], now
        now = time.monotonic()
        out_of_time = max_minutes is not None and (elapsed_before + now - t_start) / 60 >= max_minutes
        if step % snapshot_every == 0 or out_of_time or step == tc.steps:
            checkpoint(snapshot=True)
            last_save = now
        elif now - last_save >= save_minutes * 60:
            checkpoint(snapshot=False)
            last_save = now
        if out_of_time:
            logger.info("stopping at step %d: --max-minutes %.1f reached", step, max_minutes)
            break
    log_file.close()
    return out / "latest"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--max-minutes", type=float, default=None, help="training-time budget over all resumes of --out: the lr decay ends and the run stops "
                   "(after saving) when it is spent")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=TrainConfig.batch)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    p.add_argument("--ema", type=float, default=TrainConfig.ema)
    p.add_argument("--min-snr-gamma", type=float, default=TrainConfig.min_snr_gamma)
    p.add_argument("--offset-noise", type=float, default=TrainConfig.offset_noise)
    p.add_argument("--channels", type=int, nargs=3, default=list(ModelConfig.block_out_channels))
    p.add_argument("--layers-per-block", type=int, default=ModelConfig.layers_per_block)
    p.add_argument("--text-dim", type=int, default=TextEncoderConfig.dim)
    p.add_argument("--text-layers", type=int, default=TextEncoderConfig.layers)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-minutes", type=float, default=4.0)
    p.add_argument("--snapshot-every", type=int, default=250)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    mc = ModelConfig(block_out_channels=tuple(a.channels), layers_per_block=a.layers_per_block,
                     text=TextEncoderConfig(dim=a.text_dim, layers=a.text_layers))
    tc = TrainConfig(steps=a.steps, batch=a.batch, lr=a.lr, warmup=a.warmup, ema=a.ema,
                     min_snr_gamma=a.min_snr_gamma, offset_noise=a.offset_noise, seed=a.seed)
    train(a.out, mc, tc, a.max_minutes, a.log_every, a.save_minutes, a.snapshot_every)


if __name__ == "__main__":
    main()
