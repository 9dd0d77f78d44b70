"""Command line of the core: inspect and convert SAE checkpoints, list hook points (python -m sae_core ...)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TextIO

from . import blocks as B
from . import cli_train
from .config import ACTIVATIONS, INPUT_SPACES
from .errors import SAEConfigError, SAEError, SAEFormatError
from .files import check_file_name, check_folder
from .formats import detect_format, load_sae, save_native
from .inspection import format_report, inspect_checkpoint
from .sae import SparseAutoencoder

FAMILY_HELP = (", ".join(B.FAMILIES)
               + " (sd1 = SD 1.x, sdxl = SDXL / Turbo, flux = FLUX.1, sd3 = SD3 / SD3.5 Medium, sd35large = SD3.5 Large)")


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    report = inspect_checkpoint(args.path, family=args.family, hook=args.hook)
    if args.json:
        out.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        out.write(format_report(report))
    if report["errors"]:
        return 1
    return 1 if args.strict and report["warnings"] else 0


# -- convert ------------------------------------------------------------------------------------


def _resolve_hook(sae: SparseAutoencoder, hook: str | None, family: str | None, src: str, err: TextIO):
    """(canonical hook point, family) for the converted file, checked against the SAE's width."""
    family = B.normalize_family(family) or sae.cfg.model_family
    hook = hook or sae.cfg.hook_point
    if hook is None:
        err.write(
            f"warning: {src}: no hook point recorded or given; the file will need a block chosen in Load SAE "
            "(pass --hook to record it)\n"
        )
        return None, family
    try:
        spec = B.check_sae_fits(sae.cfg.d_in, hook, family, source=src)
    except B.AmbiguousBlockError:
        err.write(
            f"warning: {src}: {hook!r} with {sae.cfg.d_in} channels exists in sd1 and sdxl; the model family "
            "is left unset (pass --family to record it)\n"
        )
        return B.canonical_name(hook), None
    return spec.diffusers, spec.family


def cmd_convert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.activation is not None and args.activation not in ACTIVATIONS:
        raise SAEConfigError(f"--activation {args.activation!r} is unknown; expected one of {sorted(ACTIVATIONS)}")
    if args.input_space is not None and args.input_space not in INPUT_SPACES:
        raise SAEConfigError(f"--input-space {args.input_space!r} is unknown; expected one of {list(INPUT_SPACES)}")
    if args.k is not None and args.k <= 0:
        raise SAEConfigError(f"--k {args.k}: expected a positive integer (latents kept per patch)")
    dst = check_file_name(args.dst, "destination")
    check_folder(dst, "SAE file")
    if dst.is_dir():
        raise SAEFormatError(f"{dst}: is a directory; expected the path of the .safetensors file to write")
    if dst.suffix != ".safetensors":
        raise SAEFormatError(
            f"{dst}: the destination must end in .safetensors (the native single-file format)"
        )
    if dst.exists() and not args.force:
        raise SAEFormatError(f"{dst}: already exists; pass --force to overwrite it")
    fmt, _ = detect_format(args.src)
    sae = load_sae(args.src, activation=args.activation, input_space=args.input_space, k=args.k)
    hook, family = _resolve_hook(sae, args.hook, args.family, str(args.src), err)
    provenance = dict(sae.cfg.provenance)
    provenance["converted_from"] = {"path": str(args.src), "format": fmt}
    given = {"hook_point": args.hook, "model_family": args.family}
    conversions = list(provenance.get("conversions", []))
    for key, value in (("hook_point", hook), ("model_family", family)):
        old = getattr(sae.cfg, key)
        if value == old:
            continue
        if given[key] is not None:  # the user's choice
            provenance["overrides"] = {**provenance.get("overrides", {}), key: value}
        else:  # canonicalised or inferred from the recorded hook point and the SAE's width
            conversions.append(f"{key} {old!r} -> {value!r}")
    if conversions:
        provenance["conversions"] = conversions
    sae.cfg = sae.cfg.replace(hook_point=hook, model_family=family, provenance=provenance)
    save_native(sae, dst)
    # Read back what was written: the file must load to the very same weights.
    back = load_sae(dst)
    if back.fingerprint() != sae.fingerprint():
        raise SAEFormatError(
            f"{dst}: written file does not read back to the same weights; disk full or faulty?"
        )
    c = back.cfg
    out.write(
        f"wrote {dst} (native, from {fmt} {args.src}): d_in={c.d_in} n_latents={c.n_latents} k={c.k} "
        f"activation={c.activation} input_space={c.input_space} hook_point={c.hook_point} "
        f"model_family={c.model_family} fingerprint={back.fingerprint()}\n"
    )
    return 0


# -- blocks -------------------------------------------------------------------------------------


def cmd_blocks(args: argparse.Namespace, out: TextIO) -> int:
    families = [B.normalize_family(args.family)] if args.family else list(B.FAMILIES)
    for fam in families:
        out.write(f"{fam}\n")
        out.write(
            "| diffusers | ComfyUI (diffusion_model.) | short | channels | grid at 512 | grid at 1024 |\n"
        )
        out.write("|---|---|---|---|---|---|\n")
        for s in B.blocks(fam):
            g512, g1024 = B.grid_size(s, 64, 64), B.grid_size(s, 128, 128)
            out.write(
                f"| {s.diffusers} | {s.comfy} | {s.short} | {s.channels} | {g512.height}x{g512.width} "
                f"| {g1024.height}x{g1024.width} |\n"
            )
        out.write("\n")
    return 0


# -- entry point --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sae_core",
        description="Inspect and convert sparse autoencoders for diffusion UNets; list the hook points.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    i = sub.add_parser("inspect", help="show format, config, hook point, tensors and anything suspicious")
    i.add_argument(
        "path", help="native .safetensors file, or a checkpoint directory (sparsify, SAELens, sdxl-unbox)"
    )
    i.add_argument("--family", help="model family to check the hook point against: " + FAMILY_HELP)
    i.add_argument("--hook", help="check against this block instead of the recorded hook point")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--strict", action="store_true", help="exit 1 on warnings too (for scripts and CI)")

    c = sub.add_parser("convert", help="write any supported checkpoint as one native .safetensors file")
    c.add_argument("src", help="native file or checkpoint directory")
    c.add_argument("dst", help="destination .safetensors file")
    c.add_argument(
        "--hook",
        help="hook point to record, any spelling (up_blocks.1.attentions.1, output_blocks.4.1, up.1.1)",
    )
    c.add_argument("--family", help="model family to record: " + FAMILY_HELP)
    # values are checked by convert itself, so a wrong one gets the same one-line error and exit 1 as a bad file
    c.add_argument(
        "--input-space", metavar="{" + ",".join(INPUT_SPACES) + "}",
        help="what the SAE reads: block output or residual update",
    )
    c.add_argument(
        "--activation", metavar="{" + ",".join(sorted(ACTIVATIONS)) + "}",
        help="override the activation (G-SAE: sigmoid_topk)",
    )
    c.add_argument("--k", type=int, help="override k (latents kept per patch)")
    c.add_argument("--force", action="store_true", help="overwrite the destination if it exists")

    b = sub.add_parser(
        "blocks", help="list the hookable blocks: diffusers and ComfyUI names, channels, grids"
    )
    b.add_argument("--family", help="only this family: " + FAMILY_HELP)

    d = sub.add_parser(
        "demo", help="learn, detect and erase a planted concept; compare PER with steering (seconds, any CPU)"
    )
    d.add_argument("--out", default="demo_output", help="folder for the comparison image")
    d.add_argument("--images", type=int, default=4, help="feature maps per CFG branch")
    d.add_argument("--gamma", type=float, default=-10.0, help="SAeUron steering multiplier to compare against")
    cli_train.add_parsers(sub)
    return p


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from .demo import run_demo  # imported here: the other commands need none of the interventions

    out.write(
        "Planted-concept world: a known direction is planted in a rectangle of each feature map, an SAE\n"
        "latent reads it, the concept is learned from statistics the SAeUron way, then erased.\n\n"
    )
    run_demo(args.out, images=args.images, gamma=args.gamma, out=out)
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def main(argv: list[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    commands = {
        "inspect": lambda: cmd_inspect(args, out),
        "convert": lambda: cmd_convert(args, out, err),
        "blocks": lambda: cmd_blocks(args, out),
        "demo": lambda: cmd_demo(args, out),
        "collect": lambda: cli_train.run(args, out),
        "train": lambda: cli_train.run(args, out),
    }
    try:
        return commands[args.command]()
    except (SAEError, OSError) as e:  # OSError: unreadable source, unwritable destination
        err.write(f"error: {_one_line(e)}\n")
        return 1
    except KeyboardInterrupt:
        err.write("error: interrupted\n")
        return 130
    except Exception as e:  # never a traceback for the user: a one-line report of what is a bug of the pack
        if os.environ.get("SAE_DEBUG"):
            raise
        err.write(f"error: unexpected {type(e).__name__}: {_one_line(e)} -- this is a bug of the pack; please report "
                  "it with the command you ran (set SAE_DEBUG=1 to see the traceback)\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
