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
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (M,) or not value.is_floating_point():
        found = (f"shape {tuple(value.shape)} dtype {str(value.dtype).replace('torch.', '')}"
                 if isinstance(value, torch.Tensor) else type(value).__name__)
        raise SAEFormatError(
            f"{path}: expected a floating-point tensor of shape ({M},) (per-latent statistics), found {found}"
        )
    return value.float()


def _flag(raw: dict, key: str, path: Path) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool) and value is not None:
        raise SAEFormatError(f"{path}: key {key!r} should be true or false, found {value!r}")
    return bool(value)


def read(directory: Path) -> tuple[SAEConfig, dict]:
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    raw = read_json(cfg_path)
    blob = read_torch_weights(w_path)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    if not isinstance(state, dict):
        where = "under 'state_dict'" if isinstance(blob, dict) else "at the top level"
        raise SAEFormatError(
            f"{w_path}: expected a dict of tensors (optionally under 'state_dict'), found {type(state).__name__} {where}"
        )
    W_enc = take(state, "encoder.weight", w_path, ndim=2)  # [M, d]
    W_dec_t = take(state, "decoder.weight", w_path, ndim=2)  # nn.Linear(M -> d).weight: [d, M]
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
    if act_name is not None and (not isinstance(act_name, str) or act_name not in ("TopK", "ReLU")):
        raise SAEFormatError(f"{w_path}: activation {act_name!r} is not supported, expected 'TopK' or 'ReLU'")
    act_state = state.get("activation_state_dict")
    if act_state is not None and not isinstance(act_state, dict):
        raise SAEFormatError(
            f"{w_path}: 'activation_state_dict' should be a dict like {{'k': 32}}, found {type(act_state).__name__}"
        )
    if act_name == "ReLU":
        activation, k = "relu", None
    elif act_name == "TopK":
        saved_k = (act_state or {}).get("k")
        if isinstance(saved_k, torch.Tensor) and saved_k.numel() == 1 and not saved_k.is_floating_point():
            saved_k = int(saved_k)
        if saved_k is not None and (not isinstance(saved_k, int) or isinstance(saved_k, bool) or saved_k <= 0):
            raise SAEFormatError(f"{w_path}: activation_state_dict['k'] should be a positive integer, found {saved_k!r}")
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
        normalization="layer_norm" if _flag(raw, "normalize", cfg_path) else "none",
        source_format="unbox",
        # sdxl-unbox folder names imply SDXL-Turbo; a hint that load_sae checks against the width
        provenance={"config": raw, "files": [CONFIG, WEIGHTS], "family_hint": "sdxl" if _hook_from_path(directory) else None,
                    "conversions": ["latent_bias -> b_enc", "pre_bias -> b_dec", "decoder.weight.T -> W_dec"]},
    )
    out = {
        "W_enc": W_enc,
        "b_enc": take(state, "latent_bias", w_path, ndim=1),
        "W_dec": W_dec_t.T.contiguous(),
        "b_dec": take(state, "pre_bias", w_path, ndim=1),
        "latent_mean": _stats(directory / "mean.pt", M),
        "latent_std": _stats(directory / "std.pt", M),
    }
    return cfg, out
