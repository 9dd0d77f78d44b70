"""sparsify / SAeUron / SAEmnesia / G-SAE directories: cfg.json + sae.safetensors."""

from __future__ import annotations

from pathlib import Path

from ..config import SAEConfig
from ..errors import SAEFormatError
from ._io import cfg_int, check_width, read_json, read_safetensors, take

CONFIG, WEIGHTS = "cfg.json", "sae.safetensors"


def read(directory: Path) -> tuple[SAEConfig, dict]:
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    raw = read_json(cfg_path)
    tensors, _ = read_safetensors(w_path)
    for flag in ("input_unit_norm", "transcode", "normalize_decoder"):
        if flag in raw and not isinstance(raw[flag], bool):
            raise SAEFormatError(f"{cfg_path}: key {flag!r} should be true or false, found {raw[flag]!r}")
    if raw.get("input_unit_norm"):
        raise SAEFormatError(
            f"{cfg_path}: input_unit_norm is true; expected false. SAeUron's published SAEs are used with "
            f"raw block outputs, and a unit-norm-input SAE cannot be applied to them as published"
        )
    W_enc = take(tensors, "encoder.weight", w_path, ndim=2)
    W_dec = take(tensors, "W_dec", w_path, ndim=2)
    d_in = cfg_int(raw, "d_in", cfg_path)
    check_width(cfg_path, "d_in", d_in, "encoder.weight", W_enc.shape[-1])
    num_latents = cfg_int(raw, "num_latents", cfg_path, default=0) or 0
    if num_latents == 0:
        factor = cfg_int(raw, "expansion_factor", cfg_path)
        num_latents = factor * d_in
    check_width(cfg_path, "num_latents (or expansion_factor * d_in)", num_latents, "encoder.weight", W_enc.shape[0])
    act = raw.get("activation", "topk")
    if not isinstance(act, str) or act not in ("topk", "groupmax"):
        raise SAEFormatError(f"{cfg_path}: activation {act!r} is unknown, expected 'topk' or 'groupmax'")
    if raw.get("transcode"):
        raise SAEFormatError(
            f"{cfg_path}: transcode is true: this is a transcoder (input and output differ), expected an SAE"
        )
    # folders named after the hook: UNet blocks, and FLUX / SD3 blocks (transformer.transformer_blocks.N, ...)
    hook = directory.name if directory.name.startswith(
        ("unet.", "up_", "down_", "mid_", "transformer.", "transformer_blocks.", "single_transformer_blocks.")) else None
    cfg = SAEConfig(
        d_in=d_in,
        n_latents=num_latents,
        k=cfg_int(raw, "k", cfg_path),
        activation="relu_topk" if act == "topk" else "groupmax",
        input_space="output",
        hook_point=hook,
        apply_b_dec_to_input=True,
        source_format="sparsify",
        provenance={"config": raw, "files": [CONFIG, WEIGHTS]},
    )
    state = {
        "W_enc": W_enc,
        "b_enc": take(tensors, "encoder.bias", w_path, ndim=1),
        "W_dec": W_dec,
        "b_dec": take(tensors, "b_dec", w_path, ndim=1),
    }
    if "W_skip" in tensors:
        state["W_skip"] = take(tensors, "W_skip", w_path, ndim=2)
    extra = sorted(set(tensors) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip"})
    if extra:
        raise SAEFormatError(f"{w_path}: unexpected tensors {extra} for a sparsify SAE")
    return cfg, state
