"""The pack's own single-file format: canonical tensors + the whole SAEConfig as JSON metadata."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..config import SAEConfig
from ..errors import SAEConfigError, SAEFormatError
from ..files import atomic_write
from ._io import read_safetensors

FORMAT = "sae-concept-eraser/sae"
VERSION = 1
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip", "latent_mean", "latent_std")


def is_native(metadata: dict[str, str]) -> bool:
    return metadata.get("format") == FORMAT


def read(path: Path) -> tuple[SAEConfig, dict]:
    tensors, metadata = read_safetensors(path)
    if not is_native(metadata):
        raise SAEFormatError(
            f"{path}: a safetensors file without this pack's metadata (format={metadata.get('format')!r}, "
            f"expected {FORMAT!r}); give the checkpoint's directory (with its cfg.json) instead, or convert "
            f"it with `python -m sae_core convert`"
        )
    text = metadata.get("format_version", "0")
    if not text.isascii() or not text.isdigit():
        raise SAEFormatError(
            f"{path}: metadata 'format_version' is {text!r}, expected a whole number like '{VERSION}'; the file "
            "was edited or written by another tool: convert the original checkpoint again"
        )
    version = int(text)
    if version > VERSION:
        raise SAEFormatError(
            f"{path}: format_version {version} is newer than this pack reads ({VERSION}); update the pack"
        )
    if "config" not in metadata:
        raise SAEFormatError(f"{path}: metadata 'config' is missing; found metadata keys {sorted(metadata)}")
    try:
        raw = json.loads(metadata["config"])
    except (json.JSONDecodeError, RecursionError) as e:
        raise SAEFormatError(f"{path}: metadata 'config' is not valid JSON ({e}); expected an object") from e
    if not isinstance(raw, dict) or not raw:
        raise SAEFormatError(
            f"{path}: metadata 'config' should be a non-empty JSON object of SAEConfig fields, found "
            f"{json.dumps(raw)[:60]}; convert the original checkpoint again"
        )
    try:
        cfg = SAEConfig.from_dict(raw)
    except SAEConfigError as e:
        raise SAEFormatError(f"{path}: metadata 'config' is invalid: {e}") from e
    unknown = sorted(set(tensors) - set(_TENSORS))
    if unknown:
        raise SAEFormatError(f"{path}: unexpected tensors {unknown}; expected some of {list(_TENSORS)}")
    missing = [k for k in _TENSORS[:4] if k not in tensors]
    if missing:
        raise SAEFormatError(f"{path}: missing tensors {missing}; found {sorted(tensors)}, expected {list(_TENSORS[:4])} "
                             "and optionally the rest of " + str(list(_TENSORS[4:])))
    return cfg, dict(tensors)


def write(sae, path: str | Path) -> Path:
    """Write ``sae`` as one native .safetensors file; returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SAEFormatError(f"{path}: native SAE files end in .safetensors")
    tensors = {}
    for name in _TENSORS:
        value = getattr(sae, name, None)
        if value is not None:
            tensors[name] = value.detach().to("cpu").contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": str(VERSION),
        "config": json.dumps(sae.cfg.to_dict(), default=str),
        # Readable at a glance with any safetensors viewer; the config above is authoritative.
        "summary": f"{sae.cfg.hook_point} {sae.cfg.model_family} {sae.cfg.input_space} "
        f"{sae.cfg.activation} k={sae.cfg.k} M={sae.cfg.n_latents} d={sae.cfg.d_in}",
    }
    # a unique temporary file beside the target, renamed over it: never a half-written file under the final name
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), what="SAE file")


