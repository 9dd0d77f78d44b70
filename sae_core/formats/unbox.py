"""sdxl-unbox / OpenAI TopK / Concept Steerers directories: config.json + state_dict.pth (+ mean.pt, std.pt)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import SAEConfig
from ..errors import SAEFormatError
from ._io import cfg_int, check_width, read_json, read_torch_weights, take

CONFIG, WEIGHTS = "config.json", "state_dict.pth"
_KNOWN = {"encoder.weight", "decoder.weight", "pre_bias", "latent_bias", "stats_last_nonzero",
          "activation", "activation_state_dict"}


def _hook_from_path(directory: Path) -> str | None:
    # sdxl-unbox saves to "<hook>_k10_hidden5120_.../final"
    for part in (directory.name, directory.parent.name):
        m = re.match(r"^((?:unet\.)?(?:down_blocks|up_blocks|mid_block)\.[\w.]*?attentions\.\d+)(?:_|$)", part)
        if m:
            return m.group(1)
    return None


def _stats(path: Path, M: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    value = read_torch_weights(path)  # saved on CUDA originally; read_torch_weights maps to CPU
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (M,):
        found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise SAEFormatError(f"{path}: expected a tensor of shape ({M},) (per-latent statistics), found {found}")
    return value.float()


def read(directory: Path) -> tuple[SAEConfig, dict]:
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    raw = read_json(cfg_path)
    blob = read_torch_weights(w_path)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise SAEFormatError(f"{w_path}: expected a dict (optionally under 'state_dict'), found {type(blob).__name__}")
    W_enc = take(state, "encoder.weight", w_path)  # [M, d]
    W_dec_t = take(state, "decoder.weight", w_path)  # nn.Linear(M -> d).weight: [d, M]
    M, d = cfg_int(raw, "n_dirs_local", cfg_path), cfg_int(raw, "d_model", cfg_path)
    check_width(cfg_path, "d_model", d, "encoder.weight (dim 1)", W_enc.shape[-1])
    check_width(cfg_path, "n_dirs_local", M, "encoder.weight (dim 0)", W_enc.shape[0])
    check_width(cfg_path, "n_dirs_local", M, "decoder.weight (dim 1)", W_dec_t.shape[-1])
    extra = sorted(set(state) - _KNOWN)
    if extra:
        raise SAEFormatError(f"{w_path}: unexpected entries {extra} for an sdxl-unbox / OpenAI SAE")

    k = cfg_int(raw, "k", cfg_path, default=None)
    activation = "topk_relu"
    act_name = state.get("activation")  # OpenAI's own state_dict records the activation class
    if act_name is not None and act_name not in ("TopK", "ReLU"):
        raise SAEFormatError(f"{w_path}: activation {act_name!r} is not supported, expected 'TopK' or 'ReLU'")
    if act_name == "ReLU":
        activation, k = "relu", None
    elif act_name == "TopK":
        saved_k = (state.get("activation_state_dict") or {}).get("k")
        if k is not None and saved_k is not None and saved_k != k:
            raise SAEFormatError(f"{cfg_path}: config says k={k} but {w_path.name} records k={saved_k}")
        k = k if k is not None else saved_k
    if activation == "topk_relu" and k is None:
        raise SAEFormatError(f"{cfg_path}: missing key 'k' (the TopK size); found keys {sorted(raw)}")

    cfg = SAEConfig(
        d_in=d,
        n_latents=M,
        k=k,
        activation=activation,
        input_space="residual",  # sdxl-unbox trains on the block's update output - input
        hook_point=_hook_from_path(directory),
        normalization="layer_norm" if raw.get("normalize") else "none",
        source_format="unbox",
        # sdxl-unbox folder names imply SDXL-Turbo; a hint that load_sae checks against the width
        provenance={"config": raw, "files": [CONFIG, WEIGHTS], "family_hint": "sdxl" if _hook_from_path(directory) else None,
                    "conversions": ["latent_bias -> b_enc", "pre_bias -> b_dec", "decoder.weight.T -> W_dec"]},
    )
    out = {
        "W_enc": W_enc,
        "b_enc": take(state, "latent_bias", w_path),
        "W_dec": W_dec_t.T.contiguous(),
        "b_dec": take(state, "pre_bias", w_path),
        "latent_mean": _stats(directory / "mean.pt", M),
        "latent_std": _stats(directory / "std.pt", M),
    }
    return cfg, out
