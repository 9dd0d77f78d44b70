"""Krea's FLUX SAEs (finebooru / "Sparse Autoencoders for flow matching models"): config.json + model.safetensors.

Written by huggingface_hub's PyTorchModelHubMixin from a TopK SAE module: config ``features`` (d), ``pages``
(M), ``k``; tensors ``encoder.weight [M, d]``, ``encoder.bias [M]``, ``decoder.weight [d, M]`` (a bias-free
Linear, so its transpose is W_dec), ``bias [d]`` (subtracted before encoding, added after decoding: b_dec).
Encode = TopK(ReLU(W_enc (x - b_dec) + b_enc)), the pack's ``relu_topk``.

Checkpoints are named after the diffusers hook: ``...single_transformer_blocks.9`` or
``...transformer_blocks.18-1``, where ``-1`` is the image stream of a double block's (text, image) output
and ``-0`` its text stream, which this pack never hooks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import SAEConfig
from ..errors import SAEFormatError
from ._io import cfg_int, check_width, read_json, read_safetensors, take

CONFIG, WEIGHTS = "config.json", "model.safetensors"
_HOOK_RE = re.compile(r"(?:^|[-_.])(?P<name>(?:single_)?transformer_blocks\.\d+)(?:-(?P<stream>\d+))?$")
KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "bias")


def looks_like(directory: Path) -> bool:
    """True when config.json is this layout's (features and pages), not a diffusers / transformers model's."""
    try:
        if (directory / CONFIG).stat().st_size > 65536:
            return False
        raw = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "features" in raw and "pages" in raw


def hook_from_name(name: str, where: Path) -> str | None:
    """The registry hook of a checkpoint directory name, or None when the name says nothing."""
    m = _HOOK_RE.search(name)
    if m is None:
        return None
    stream = m.group("stream")
    if stream is not None and m.group("name").startswith("transformer_blocks") and stream != "1":
        raise SAEFormatError(
            f"{where}: trained on stream {stream} of {m.group('name')} (the text tokens of the (text, image) output); "
            "expected stream 1, the image tokens, which is what this pack detects on. Use the '-1' checkpoint"
        )
    return m.group("name")


def read(directory: Path) -> tuple[SAEConfig, dict]:
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    raw = read_json(cfg_path)
    tensors, _ = read_safetensors(w_path)
    if "k" not in raw:
        raise SAEFormatError(f"{cfg_path}: no 'k'; expected a TopK SAE (features, pages, k). The standard, gated and "
                             "JumpReLU variants of this layout are not supported")
    d, M = cfg_int(raw, "features", cfg_path), cfg_int(raw, "pages", cfg_path)
    W_enc = take(tensors, "encoder.weight", w_path, ndim=2)
    dec = take(tensors, "decoder.weight", w_path, ndim=2)
    check_width(cfg_path, "features", d, "encoder.weight", W_enc.shape[1])
    check_width(cfg_path, "pages", M, "encoder.weight", W_enc.shape[0])
    if tuple(dec.shape) != (d, M):
        raise SAEFormatError(f"{w_path}: decoder.weight has shape {tuple(dec.shape)}, expected ({d}, {M}) = (features, pages)")
    extra = sorted(set(tensors) - set(KEYS))
    if extra:
        raise SAEFormatError(f"{w_path}: unexpected tensors {extra} for a TopK SAE of this layout (expected {list(KEYS)})")
    hook = hook_from_name(directory.name, directory)
    cfg = SAEConfig(
        d_in=d,
        n_latents=M,
        k=cfg_int(raw, "k", cfg_path),
        activation="relu_topk",
        input_space="output",
        hook_point=hook,
        apply_b_dec_to_input=True,
        source_format="finebooru",
        provenance={"config": raw, "files": [CONFIG, WEIGHTS], "family_hint": "flux" if hook else None},
    )
    state = {"W_enc": W_enc, "b_enc": take(tensors, "encoder.bias", w_path, ndim=1), "W_dec": dec.T.contiguous(),
             "b_dec": take(tensors, "bias", w_path, ndim=1)}
    return cfg, state
