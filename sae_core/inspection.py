"""Inspecting an SAE checkpoint: format, config, hook point, tensors and anything suspicious, as a report (a
dict for JSON) and its text form. The command line (python -m sae_core inspect) only parses and prints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from . import blocks as B
from .errors import SAEError, SAENonFiniteError
from .formats import read_checkpoint
from .sae import SparseAutoencoder

# Image sizes at which inspect shows the block's grid (latent = image / 8).
_SHOWN_SIZES = (512, 1024)
# Config flags (of the original format, kept in provenance) that promise unit-norm decoder rows.
_UNIT_NORM_FLAGS = ("normalize_decoder", "normalize_sae_decoder")
_CONFIG_FIELDS = (
    "d_in",
    "n_latents",
    "k",
    "activation",
    "input_space",
    "hook_point",
    "model_family",
    "normalization",
    "apply_b_dec_to_input",
    "source_format",
)


# -- inspect ------------------------------------------------------------------------------------


def _unit_norm_expected(cfg) -> str | None:
    """The config flag that promises unit-norm decoder rows, if the original config has one set."""
    original = cfg.provenance.get("config") or {}
    for flag in _UNIT_NORM_FLAGS:
        if original.get(flag) is True:
            return flag
    return None


def _stats(t: torch.Tensor) -> dict[str, float]:
    t = t.double()
    return {"min": float(t.min()), "mean": float(t.mean()), "max": float(t.max())}


def _ids(mask: torch.Tensor, limit: int = 10) -> list[int]:
    return [int(i) for i in torch.nonzero(mask).flatten()[:limit]]


def _block_report(cfg, hook: str | None, family: str | None, report: dict) -> None:
    """Fill report["block"], report["family"] and block warnings/errors from the hook point."""
    warnings, errors = report["warnings"], report["errors"]
    asked = B.normalize_family(family)
    if asked and cfg.model_family and asked != cfg.model_family:
        errors.append(
            f"{report['path']}: the SAE records model_family={cfg.model_family!r} but {asked!r} was asked for; "
            f"an SAE only reads the activations of the model it was trained on"
        )
    family = asked or cfg.model_family
    report["family"] = family
    hook = hook or cfg.hook_point
    if hook is None:
        warnings.append(
            "no hook point recorded: choose the block in Load SAE, or write it into the file with "
            "`convert --hook NAME` (names: `python -m sae_core blocks`)"
        )
        return
    try:
        spec = B.check_sae_fits(cfg.d_in, hook, family, source=report["path"])
    except B.AmbiguousBlockError:
        name = B.canonical_name(hook)
        report["block"] = {"diffusers": name, "family": None}
        warnings.append(
            f"hook point {hook!r} exists in several model families with {cfg.d_in} channels; "
            f"the family is unknown: pass --family (one of {', '.join(B.FAMILIES)}), or write it with `convert --family`"
        )
        return
    except B.BlockMismatchError as e:
        errors.append(str(e))
        return
    except B.BlockError as e:
        try:  # a block of another family: the SAE cannot serve this model at all
            B.canonical_name(hook)
            errors.append(str(e))
        except B.BlockError:  # a name the registry does not know: the block can still be chosen by hand
            warnings.append(f"{e} -- choose the block in Load SAE, or record it with `convert --hook`")
        return
    report["family"] = spec.family
    report["block"] = {
        "diffusers": spec.diffusers,
        "comfy_key": spec.comfy_key,
        "short": spec.short,
        "family": spec.family,
        "channels": spec.channels,
        "stride": spec.stride,
        "grids": {f"{s}x{s}": list(B.grid_size(spec, s // 8, s // 8)) for s in _SHOWN_SIZES},
    }
    if cfg.hook_point is not None and hook == cfg.hook_point and cfg.hook_point != spec.diffusers:
        report["notes"].append(f"hook point {cfg.hook_point!r} is {spec.diffusers!r} ({spec.family})")


def inspect_checkpoint(
    path: str | Path, *, family: str | None = None, hook: str | None = None
) -> dict[str, Any]:
    """Everything `inspect` shows, as a JSON-ready dict; problems go to "warnings" and "errors".

    Raises SAEError only when the checkpoint cannot be read at all.
    """
    fmt, cfg, tensors, where = read_checkpoint(path)
    tensors = {k: v for k, v in tensors.items() if v is not None}
    report: dict[str, Any] = {
        "path": str(path),
        "format": fmt,
        "resolved": str(where),
        "source_format": cfg.source_format,
        "config": {f: getattr(cfg, f) for f in _CONFIG_FIELDS},
        "provenance": {k: v for k, v in cfg.provenance.items() if k != "config"},
        "original_config": cfg.provenance.get("config"),
        "files": [],
        "tensors": [],
        "non_finite": {},
        "block": None,
        "family": None,
        "warnings": [],
        "errors": [],
        "notes": [],
    }
    warnings, errors = report["warnings"], report["errors"]
    files = [where] if where.is_file() else sorted(p for p in where.iterdir() if p.is_file())
    report["files"] = [{"name": p.name, "bytes": p.stat().st_size} for p in files]
    for name, t in tensors.items():
        report["tensors"].append(
            {
                "name": name,
                "shape": list(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
                "mib": round(t.numel() * t.element_size() / 2**20, 3),
            }
        )
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                report["non_finite"][name] = bad
    for name, bad in report["non_finite"].items():
        errors.append(
            f"{where}: tensor {name!r} holds {bad} NaN/inf values; the checkpoint is corrupt or diverged"
        )

    # Does the module build (shapes agree with the config)? Non-finite values are reported above.
    try:
        SparseAutoencoder(cfg, source=str(where), **tensors)
    except SAENonFiniteError:
        pass
    except SAEError as e:
        errors.append(str(e))

    W_dec = tensors.get("W_dec")
    if W_dec is not None and W_dec.ndim == 2:
        norms = torch.linalg.vector_norm(W_dec.double(), dim=1)
        finite = torch.isfinite(norms)
        report["decoder_row_norm"] = _stats(norms[finite]) if bool(finite.any()) else None
        zero = norms == 0
        report["dead_latents"] = {"zero_decoder_rows": int(zero.sum()), "first_ids": _ids(zero)}
        if bool(zero.any()):
            warnings.append(
                f"{int(zero.sum())} of {W_dec.shape[0]} latents have an all-zero decoder row (dead-looking; "
                f"first ids {_ids(zero)}): they can fire but never change the reconstruction"
            )
        flag = _unit_norm_expected(cfg)
        report["unit_norm_expected"] = flag
        if flag:
            tol = 1e-3 if W_dec.dtype in (torch.float32, torch.float64) else 1e-2
            off = finite & ~zero & ((norms - 1).abs() > tol)
            if bool(off.any()):
                worst = int(torch.argmax(torch.where(off, (norms - 1).abs(), torch.zeros_like(norms))))
                warnings.append(
                    f"{int(off.sum())} of {W_dec.shape[0]} decoder rows are not unit norm (|norm - 1| > {tol}; "
                    f"row {worst} has norm {float(norms[worst]):.6g}) although the original config sets "
                    f"{flag}=true: the weights were changed after training or saved mid-step; codes and "
                    f"concept thresholds learned elsewhere will not transfer"
                )
    W_enc = tensors.get("W_enc")
    if W_enc is not None and W_enc.ndim == 2:
        zero_enc = torch.linalg.vector_norm(W_enc.double(), dim=1) == 0
        report["dead_latents"] = {**report.get("dead_latents", {}), "zero_encoder_rows": int(zero_enc.sum())}
        if bool(zero_enc.any()):
            warnings.append(
                f"{int(zero_enc.sum())} latents have an all-zero encoder row (they never depend on the "
                f"input; first ids {_ids(zero_enc)})"
            )
    for name in ("latent_mean", "latent_std", "threshold"):
        if name in tensors and tensors[name].is_floating_point():
            t = tensors[name]
            ok = torch.isfinite(t)
            report[name] = _stats(t[ok]) if bool(ok.any()) else None
    if "threshold" in tensors and bool((tensors["threshold"] < 0).any()):
        warnings.append(
            f"{int((tensors['threshold'] < 0).sum())} JumpReLU thresholds are negative: those latents "
            "act as plain ReLU"
        )
    if "latent_std" in tensors and bool((tensors["latent_std"] <= 0).any()):
        warnings.append(
            f"{int((tensors['latent_std'] <= 0).sum())} entries of latent_std are <= 0 (std.pt): "
            "interventions scaled by it are meaningless for those latents"
        )
    if cfg.n_latents < cfg.d_in:
        warnings.append(
            f"n_latents={cfg.n_latents} is smaller than d_in={cfg.d_in}: not an overcomplete SAE; check "
            "that the weights were not read transposed"
        )
    _block_report(cfg, hook, family, report)
    return report


def _fmt_num(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else str(x)


def format_report(r: dict[str, Any]) -> str:
    c = r["config"]
    src = r["format"] if r["format"] != "native" else f"native (converted from {r['source_format']})"
    lines = [
        f"path          {r['path']}" + (f" -> {r['resolved']}" if r["resolved"] != r["path"] else ""),
        f"format        {src}",
        "config        " + " ".join(f"{k}={c[k]}" for k in ("d_in", "n_latents", "k", "activation")),
        "              "
        + " ".join(f"{k}={c[k]}" for k in ("input_space", "normalization", "apply_b_dec_to_input")),
    ]
    b = r["block"]
    if b and "comfy_key" in b:
        grids = ", ".join(f"{g[0]}x{g[1]} at {s}" for s, g in b["grids"].items())
        lines.append(
            f"hook point    {b['diffusers']} = {b['comfy_key']} (short {b['short']}): {b['family']}, "
            f"{b['channels']} channels, grid {grids}"
        )
    elif b:
        lines.append(f"hook point    {b['diffusers']} (family unknown)")
    else:
        lines.append(f"hook point    {c['hook_point'] or 'none recorded'}")
    lines.append(f"family        {r['family'] or 'unknown'}")
    for note in r["notes"]:
        lines.append(f"note          {note}")
    prov = r["provenance"]
    if prov.get("converted_from"):
        lines.append(
            f"converted     from {prov['converted_from']['format']} {prov['converted_from']['path']}"
        )
    if prov.get("overrides"):
        lines.append("overrides     " + ", ".join(f"{k}={v}" for k, v in prov["overrides"].items()))
    if prov.get("conversions"):
        lines.append("conversions   " + "; ".join(map(str, prov["conversions"])))
    lines.append("files         " + ", ".join(f"{f['name']} ({f['bytes']} bytes)" for f in r["files"]))
    lines.append("tensors")
    for t in r["tensors"]:
        lines.append(f"  {t['name']:<12}{str(t['shape']):<16}{t['dtype']:<10}{t['mib']} MiB")
    n = r.get("decoder_row_norm")
    if n:
        expect = (
            f" (unit norm expected: {r['unit_norm_expected']}=true)" if r.get("unit_norm_expected") else ""
        )
        lines.append(
            f"decoder norm  min {_fmt_num(n['min'])}  mean {_fmt_num(n['mean'])}  max {_fmt_num(n['max'])}{expect}"
        )
    for name in ("latent_mean", "latent_std", "threshold"):
        if r.get(name):
            s = r[name]
            lines.append(
                f"{name:<14}min {_fmt_num(s['min'])}  mean {_fmt_num(s['mean'])}  max {_fmt_num(s['max'])}"
            )
    d = r.get("dead_latents")
    if d:
        lines.append(
            f"dead-looking  {d.get('zero_decoder_rows', 0)} zero decoder rows, "
            f"{d.get('zero_encoder_rows', 0)} zero encoder rows"
        )
    nf = r["non_finite"]
    lines.append("non-finite    " + (", ".join(f"{k}: {v}" for k, v in nf.items()) if nf else "none"))
    for w in r["warnings"]:
        lines.append(f"WARNING       {w}")
    for e in r["errors"]:
        lines.append(f"ERROR         {e}")
    return "\n".join(lines) + "\n"
