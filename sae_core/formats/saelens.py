"""SAELens directories: cfg.json + sae_weights.safetensors (v6 configs and pre-6.0 ones)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import SAEConfig
from ..errors import SAEFormatError
from ._io import cfg_int, check_width, read_json, read_safetensors, take

CONFIG, WEIGHTS = "cfg.json", "sae_weights.safetensors"


def _architecture(raw: dict, path: Path) -> tuple[str, int | None]:
    """(our activation, k) from a v6 'architecture' or a pre-6.0 'activation_fn_str'."""
    arch = raw.get("architecture", "standard")
    fn = raw.get("activation_fn_str", "relu")
    if arch == "standard" and fn == "topk":  # pre-6.0 TopK SAEs were 'standard' with a topk activation
        arch = "topk"
    if arch == "topk":
        k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
        if not isinstance(k, int):
            raise SAEFormatError(f"{path}: architecture 'topk' needs an integer 'k' (or activation_fn_kwargs.k)")
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
    W_enc = take(tensors, "W_enc", w_path)  # SAELens stores [d_in, d_sae]
    W_dec = take(tensors, "W_dec", w_path)
    if W_enc.ndim != 2:
        raise SAEFormatError(f"{w_path}: W_enc should be 2-D [d_in, d_sae], found shape {tuple(W_enc.shape)}")
    d_in, d_sae = cfg_int(raw, "d_in", cfg_path), cfg_int(raw, "d_sae", cfg_path)
    check_width(cfg_path, "d_in", d_in, "W_enc (dim 0)", W_enc.shape[0])
    check_width(cfg_path, "d_sae", d_sae, "W_enc (dim 1)", W_enc.shape[1])
    state = {"W_enc": W_enc.T.contiguous(), "b_enc": take(tensors, "b_enc", w_path), "W_dec": W_dec,
             "b_dec": take(tensors, "b_dec", w_path)}
    if activation == "jumprelu":
        if "threshold" in tensors:
            state["threshold"] = tensors["threshold"]
        elif "log_threshold" in tensors:  # training checkpoints keep the log
            state["threshold"] = tensors["log_threshold"].exp()
        else:
            raise SAEFormatError(f"{w_path}: a jumprelu SAE needs a 'threshold' tensor; found keys {sorted(tensors)}")
    provenance = {"config": raw, "files": [CONFIG, WEIGHTS], "conversions": ["W_enc transposed to [d_sae, d_in]"]}

    norm = raw.get("normalize_activations", "none")
    if norm in (None, False):
        norm = "none"
    scale = raw.get("norm_scaling_factor")
    if norm == "expected_average_only_in":
        # Runtime identity in SAELens; a factor that was never folded is folded here, exactly.
        if scale is not None:
            _fold_input_scale(state, float(scale))
            provenance["conversions"].append(f"folded norm_scaling_factor={scale}")
        norm = "none"
    if norm not in ("none", "layer_norm", "constant_norm_rescale"):
        raise SAEFormatError(f"{cfg_path}: normalize_activations {norm!r} is not supported")
    if raw.get("finetuning_scaling_factor") or "scaling_factor" in tensors:
        s = take(tensors, "scaling_factor", w_path)
        state["W_dec"] = state["W_dec"] * s[:, None]  # decode((f * s)) == f @ (s[:, None] * W_dec)
        provenance["conversions"].append("folded finetuning scaling_factor into W_dec")
    if raw.get("reshape_activations", "none") not in ("none", None):
        raise SAEFormatError(f"{cfg_path}: reshape_activations {raw['reshape_activations']!r} is not supported")

    meta = raw.get("metadata") or raw.get("meta") or {}
    hook = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    cfg = SAEConfig(
        d_in=d_in,
        n_latents=d_sae,
        k=k,
        activation=activation,
        input_space="output",
        hook_point=hook,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
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
