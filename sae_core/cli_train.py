"""The `collect` and `train` commands of `python -m sae_core`: record a block's activations, train an SAE on them."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import TextIO

import torch

from .collect import CollectSettings, collect_pipeline, is_shapes_model, load_pipeline
from .errors import SAEConfigError, SAEError, SAEFormatError, SAEInputError
from .formats import save_native

logger = logging.getLogger(__name__)


def add_parsers(sub) -> None:
    c = sub.add_parser(
        "collect", help="run a diffusers pipeline (model id or folder) over prompts and record a block's activations",
        description="Record a block's output (or residual update) over prompts into a dataset folder of safetensors "
        "shards plus manifest.json, for `train`. Memory stays bounded by --shard-rows.",
    )
    c.add_argument("--model", required=True,
                   help="diffusers pipeline: Hugging Face model id or a folder written by save_pretrained "
                   "(the shapes-world model: python -m shapes_world.collect with the same arguments)")
    c.add_argument("--block", required=True,
                   help="block to record, any spelling: up_blocks.1.attentions.1, output_blocks.4.1 "
                   "(`python -m sae_core blocks`), or any submodule name of the UNet/transformer")
    c.add_argument("--out", required=True, help="dataset folder to create")
    c.add_argument("--prompts", help="text file, one prompt per line (blank lines and lines starting with # skipped)")
    c.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    c.add_argument("--input-space", choices=("output", "residual"), default="output",
                   help="block output (SAeUron) or residual update output - input (sdxl-unbox)")
    c.add_argument("--branches", choices=("cond", "uncond", "both"), default="cond", help="CFG branches recorded")
    c.add_argument("--record-steps", default="all", help="'all' or step indices, e.g. 0,5,10 (0 = first step)")
    c.add_argument("--patches-per-map", type=int, help="random patch positions kept per map and step (default all)")
    c.add_argument("--shard-rows", type=int, default=262_144, help="rows per shard; bounds the memory of collection")
    c.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="storage dtype")
    c.add_argument("--steps", type=int, default=20, help="denoising steps per prompt")
    c.add_argument("--guidance", type=float, help="CFG scale (default 7.5; 3.0 for the shapes model)")
    c.add_argument("--height", type=int, help="image height (pipeline default when unset)")
    c.add_argument("--width", type=int, help="image width (pipeline default when unset)")
    c.add_argument("--negative-prompt", help="negative prompt (diffusers pipelines)")
    c.add_argument("--batch", type=int, help="prompts per pipeline call (default 1; 32 for the shapes model)")
    c.add_argument("--seed", type=int, default=0, help="noise seed of the first batch (+batch index after)")
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    c.add_argument("--model-dtype", choices=("float32", "float16", "bfloat16"),
                   help="weights dtype of the pipeline (default float16 on CUDA, float32 on CPU)")
    c.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")

    t = sub.add_parser(
        "train", help="train a ReLU-TopK SAE on a collected dataset folder (runs data-parallel under torchrun)",
        description="Train a TopK SAE (AuxK, unit-norm decoder) on a dataset folder written by `collect`. Under "
        "`torchrun --nproc_per_node N -m sae_core train ...` every process takes 1/N of each batch.",
    )
    t.add_argument("dataset", help="dataset folder (manifest.json + shards)")
    t.add_argument("--out", required=True, help="SAE file to write (.safetensors, the pack's native format)")
    t.add_argument("--latents", type=int, required=True, help="dictionary size M")
    t.add_argument("--k", type=int, required=True, help="latents kept per patch")
    t.add_argument("--steps", type=int, default=10_000, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=4096, help="rows per step over all processes")
    t.add_argument("--lr", type=float, help="Adam learning rate (default 2e-4 / sqrt(M / 2^14))")
    t.add_argument("--auxk-alpha", type=float, default=1 / 32, help="weight of the AuxK loss")
    t.add_argument("--dead-after", type=int, default=200_000, help="rows without firing before a latent counts as dead")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--holdout-shards", type=int, default=1, help="last shards kept for evaluation")
    t.add_argument("--buffer-shards", type=int, default=4, help="shards shuffled together")
    t.add_argument("--log-every", type=int, default=100)
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--checkpoint-dir", help="checkpoint folder (default: OUT without suffix + '.ckpt')")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint folder")
    t.add_argument("--max-minutes", type=float, help="stop after this long (checkpoint kept; --resume continues)")
    t.add_argument("--device", default="auto", help="cpu, cuda or auto")
    t.add_argument("--amp", choices=("auto", "off"), default="auto", help="bfloat16 autocast on CUDA (auto) or fp32")
    t.add_argument("--family", help="model family to record in the SAE: sd1, sdxl, flux, sd3 or sd35large")
    t.add_argument("--threads", type=int, help="CPU threads per process (torch.set_num_threads)")
    t.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise SAEConfigError(f"--device {name!r}: not a device ({e}); use cpu, cuda, cuda:N or auto") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SAEConfigError(f"--device {name!r}: CUDA is not available here; use --device cpu")
    return dev


def read_prompts(path: str | None, inline: list[str]) -> list[str]:
    prompts = list(inline)
    if path:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SAEFormatError(f"{p}: cannot read the prompt file ({e}); give a UTF-8 text file, one prompt per line") from e
        prompts += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise SAEConfigError("collect: no prompts; give --prompts FILE (one per line) or --prompt TEXT")
    return prompts


def _record_steps(text: str) -> tuple[int, ...] | None:
    if text.strip().lower() == "all":
        return None
    try:
        steps = tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise SAEConfigError(f"--record-steps {text!r}: expected 'all' or comma-separated step indices like 0,5,10") from None
    if not steps or min(steps) < 0:
        raise SAEConfigError(f"--record-steps {text!r}: expected non-negative step indices")
    return steps


class Progress:
    """One status line, rewritten in place on a terminal, a line per update elsewhere (logs)."""

    def __init__(self, out: TextIO, label: str):
        self.out, self.label, self.t0 = out, label, time.time()
        self.tty = hasattr(out, "isatty") and out.isatty()

    def __call__(self, done: int, total: int, extra: str = "") -> None:
        el = time.time() - self.t0
        eta = el / done * (total - done) if done else 0.0
        width = 24
        bar = "#" * int(width * done / total) + "-" * (width - int(width * done / total))
        line = f"{self.label} [{bar}] {done}/{total} {el:.0f}s elapsed, ~{eta:.0f}s left {extra}"
        self.out.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done == total:
            self.out.write("\n")
        self.out.flush()


def cmd_collect(args: argparse.Namespace, out: TextIO, driver=None) -> int:
    """``driver(args, prompts, settings, device, progress) -> manifest`` collects from a model that is not a diffusers
    pipeline (the shapes world passes its own); None = a diffusers pipeline."""
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = read_prompts(args.prompts, args.prompt)
    settings = CollectSettings(input_space=args.input_space, branches=args.branches,
                               step_indices=_record_steps(args.record_steps), patches_per_map=args.patches_per_map,
                               shard_rows=args.shard_rows, dtype=args.dtype, seed=args.seed)
    if args.steps < 1:
        raise SAEConfigError(f"--steps {args.steps}: expected at least 1 denoising step")
    dev = _device(args.device)
    progress = Progress(out, "collect")
    t0 = time.time()
    if driver is not None:
        m = driver(args, prompts, settings, dev, progress)
    elif is_shapes_model(args.model):
        raise SAEInputError(
            f"--model {args.model}: a shapes-world model folder, expected a diffusers pipeline; collect from it with "
            "`python -m shapes_world.collect` and the same arguments"
        )
    else:
        dtype = args.model_dtype or ("float16" if dev.type == "cuda" else "float32")
        out.write(f"loading pipeline {args.model} ({dtype}, {dev})\n")
        pipe = load_pipeline(args.model, dtype, str(dev))
        m = collect_pipeline(pipe, prompts, args.block, args.out, settings, steps=args.steps,
                             guidance=7.5 if args.guidance is None else args.guidance, height=args.height,
                             width=args.width, seed=args.seed, batch=args.batch or 1,
                             negative_prompt=args.negative_prompt, model_id=str(args.model), progress=progress,
                             overwrite=args.overwrite)
    out.write(f"wrote {args.out}: {m['rows']} rows x {m['d_in']} channels of {m['block']} ({m['input_space']}, "
              f"{m['branches']}) in {len(m['shards'])} shard(s), {time.time() - t0:.0f} s\n")
    return 0


def cmd_train(args: argparse.Namespace, out: TextIO) -> int:
    from .blocks import canonical_name, normalize_family
    from .dataset import ActivationDataset
    from .trainer import StreamConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    dst = Path(args.out)
    if dst.suffix != ".safetensors":
        raise SAEConfigError(f"--out {dst}: the SAE is written in the native format; use a .safetensors name")
    if dst.exists() and not args.force and not args.resume:
        raise SAEConfigError(f"--out {dst}: exists; pass --force to overwrite it (or --resume to continue its run)")
    ds = ActivationDataset.open(args.dataset)
    cfg = StreamConfig(n_latents=args.latents, k=args.k, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       auxk_alpha=args.auxk_alpha, dead_after_tokens=args.dead_after, seed=args.seed,
                       holdout_shards=args.holdout_shards, buffer_shards=args.buffer_shards, log_every=args.log_every,
                       checkpoint_every=args.checkpoint_every, amp=args.amp)
    rank = int(os.environ.get("RANK", "0"))
    m = ds.manifest
    block = m.get("block")
    family = normalize_family(args.family) if args.family else (m.get("model") or {}).get("family")
    # a hook point names an SD 1.x / SDXL block; for other models the block stays in the provenance only
    hook = None
    if block and family:
        try:
            hook = canonical_name(block)
        except Exception:  # noqa: BLE001 - a block outside the registry is recorded in the provenance
            hook = None
    sae_config = {"input_space": m.get("input_space", "output"), "hook_point": hook, "model_family": family,
                  "provenance": {"dataset": {k: m.get(k) for k in ("model", "block", "input_space", "branches", "rows",
                                                                    "sampler", "recorder")}
                                 | {"prompts": len(m.get("prompts") or []), "folder": Path(args.dataset).name}}}
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else dst.with_suffix(".ckpt")
    progress = Progress(out, "train") if rank == 0 else None

    def report(step: int, e: dict) -> None:
        if progress is not None:
            progress(step, cfg.steps, f"fvu {e['fvu']:.4f} l0 {e['l0']:.2f} dead {e['dead_fraction']:.3f} "
                     f"auxk {e['auxk']:.4f} {e['rows_per_s']:.0f} rows/s")

    if rank == 0:
        out.write(f"training M={cfg.n_latents} k={cfg.k} on {ds.folder} ({m['rows']} rows x {ds.d_in}, "
                  f"{len(ds.shards) - cfg.holdout_shards} training shard(s)); checkpoints in {ckpt}\n")
    try:
        res = _train(ds, cfg, ckpt, args, report, sae_config)
    except KeyboardInterrupt:
        if rank == 0:
            out.write(f"\ninterrupted; the last checkpoint is in {ckpt}: run again with --resume to continue\n")
        return 130
    if rank != 0:
        return 0
    if not res.finished:
        out.write(f"stopped at step {res.step} of {cfg.steps} (--max-minutes); checkpoint in {ckpt}: "
                  "run again with --resume to continue\n")
        return 0
    save_native(res.sae, dst)
    h = res.holdout
    held = f"held-out fvu {h['fvu']:.4f}, l0 {h['l0']:.2f}, dead {h['dead_fraction']:.3f} ({h['rows']} rows)" if h else \
        "no held-out shard"
    out.write(f"wrote {dst}: {held}\n")
    return 0


def _train(ds, cfg, ckpt, args, report, sae_config):
    from .trainer import train_stream

    try:
        return train_stream(ds, cfg, checkpoint_dir=ckpt, resume=args.resume, device=_device(args.device),
                           callback=report, sae_config=sae_config,
                           max_seconds=None if args.max_minutes is None else args.max_minutes * 60)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main_collect(argv: list[str] | None, driver, prog: str, out: TextIO | None = None) -> int:
    """`collect` as a command of its own with a model driver (``python -m shapes_world.collect``): the same arguments
    and one-line errors as ``python -m sae_core collect``."""
    import sys

    out = out or sys.stdout
    p = argparse.ArgumentParser(prog=prog)
    add_parsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["collect", *(sys.argv[1:] if argv is None else argv)])
    try:
        return cmd_collect(args, out, driver=driver)
    except (SAEError, OSError) as e:
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return 1


def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "collect":
        return cmd_collect(args, out)
    return cmd_train(args, out)

