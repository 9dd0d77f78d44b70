"""SAELens directories: cfg.json + sae_weights.safetensors (v6 configs and pre-6.0 ones)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import SAEConfig
from ..errors import SAEFormatError, SAEShapeError
from ._io import cfg_int, cfg_str, check_width, read_json, read_safetensors, take

CONFIG, WEIGHTS = "cfg.json", "sae_weights.safetensors"


def _architecture(raw: dict, path: Path) -> tuple[str, int | None]:
    """(our activation, k) from a v6 'architecture' or a pre-6.0 'activation_fn_str'."""
    arch = cfg_str(raw, "architecture", path, "standard")
    fn = cfg_str(raw, "activation_fn_str", path, "relu")
    kwargs = raw.get("activation_fn_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise SAEFormatError(f"{path}: key 'activation_fn_kwargs' should be an object, found {kwargs!r}")
    if arch == "standard" and fn == "topk":  # pre-6.0 TopK SAEs were 'standard' with a topk activation
        arch = "topk"
    if arch == "topk":
        k = raw.get("k", (kwargs or {}).get("k"))
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise SAEFormatError(
                f"{path}: architecture 'topk' needs a positive integer 'k' (or activation_fn_kwargs.k), found {k!r}"
            )
        return "topk_relu", k
    if arch == "standard":
        if fn != "relu":
            raise SAEFormatError(f"{path}: activation_fn_str {fn!r} is not supported, expected 'relu' or 'topk'")
        return "relu", None
    if arch == "jumprelu":
        return "jumprelu", None
    raise SAEFormatError(
        f"{path}: architecture {arch!r} is not supported; expected one of standard, topk, jumprelu"
    )


def read(directory: Path) -> tuple[SAEConfig, dict]:
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    raw = read_json(cfg_path)
    tensors, _ = read_safetensors(w_path)
    activation, k = _architecture(raw, cfg_path)
    W_enc = take(tensors, "W_enc", w_path, ndim=2)  # SAELens stores [d_in, d_sae]
    W_dec = take(tensors, "W_dec", w_path, ndim=2)
    d_in, d_sae = cfg_int(raw, "d_in", cfg_path), cfg_int(raw, "d_sae", cfg_path)
    check_width(cfg_path, "d_in", d_in, "W_enc (dim 0)", W_enc.shape[0])
    check_width(cfg_path, "d_sae", d_sae, "W_enc (dim 1)", W_enc.shape[1])
    state = {"W_enc": W_enc.T.contiguous(), "b_enc": take(tensors, "b_enc", w_path, ndim=1), "W_dec": W_dec,
             "b_dec": take(tensors, "b_dec", w_path, ndim=1)}
    if activation == "jumprelu":
        if "threshold" in tensors:
            state["threshold"] = take(tensors, "threshold", w_path, ndim=1)
        elif "log_threshold" in tensors:  # training checkpoints keep the log
            state["threshold"] = take(tensors, "log_threshold", w_path, ndim=1).exp()
        else:
            raise SAEFormatError(f"{w_path}: a jumprelu SAE needs a 'threshold' tensor; found keys {sorted(tensors)}")
    provenance = {"config": raw, "files": [CONFIG, WEIGHTS], "conversions": ["W_enc transposed to [d_sae, d_in]"]}

    norm = raw.get("normalize_activations", "none")
    if norm in (None, False):
        norm = "none"
    if not isinstance(norm, str):
        raise SAEFormatError(f"{cfg_path}: key 'normalize_activations' should be a string, found {norm!r}")
    scale = raw.get("norm_scaling_factor")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise SAEFormatError(f"{cfg_path}: key 'norm_scaling_factor' should be a positive number, found {scale!r}")
    if norm == "expected_average_only_in":
        # Runtime identity in SAELens; a factor that was never folded is folded here, exactly.
        if scale is not None:
            _fold_input_scale(state, float(scale))
            provenance["conversions"].append(f"folded norm_scaling_factor={scale}")
        norm = "none"
    if norm not in ("none", "layer_norm", "constant_norm_rescale"):
        raise SAEFormatError(f"{cfg_path}: normalize_activations {norm!r} is not supported")
    if raw.get("finetuning_scaling_factor") or "scaling_factor" in tensors:
        s = take(tensors, "scaling_factor", w_path, ndim=1)
        if s.shape[0] != d_sae:
            raise SAEShapeError(f"{w_path}: tensor 'scaling_factor' has shape {tuple(s.shape)}, expected ({d_sae},)")
        state["W_dec"] = state["W_dec"] * s[:, None]  # decode((f * s)) == f @ (s[:, None] * W_dec)
        provenance["conversions"].append("folded finetuning scaling_factor into W_dec")
    if not isinstance(raw.get("reshape_activations", "none"), (str, type(None))) or raw.get(
            "reshape_activations", "none") not in ("none", None):
        raise SAEFormatError(f"{cfg_path}: reshape_activations {raw['reshape_activations']!r} is not supported")

    meta = raw.get("metadata") or raw.get("meta") or {}
    if not isinstance(meta, dict):
        raise SAEFormatError(f"{cfg_path}: key 'metadata' should be an object, found {type(meta).__name__}")
    hook = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    if hook is not None and not isinstance(hook, str):
        raise SAEFormatError(f"{cfg_path}: the hook name should be a string, found {hook!r}")
    apply_b_dec = raw.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise SAEFormatError(f"{cfg_path}: key 'apply_b_dec_to_input' should be true or false, found {apply_b_dec!r}")
    cfg = SAEConfig(
        d_in=d_in,
        n_latents=d_sae,
        k=k,
        activation=activation,
        input_space="output",
        hook_point=hook,
        apply_b_dec_to_input=apply_b_dec,
        normalization=norm,
        source_format="saelens",
        provenance=provenance,
    )
    return cfg, state


@torch.no_grad()
def _fold_input_scale(state: dict, s: float) -> None:
    """SAE(x * s) / s as plain weights: W_enc * s, W_dec / s, b_dec / s."""
    state["W_enc"] = state["W_enc"] * s
    state["W_dec"] = state["W_dec"] / s
    state["b_dec"] = state["b_dec"] / s
