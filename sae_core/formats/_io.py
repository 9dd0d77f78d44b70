"""Safe readers shared by the converters: JSON configs, safetensors files, weights-only torch files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import SAEFormatError, UnsafeCheckpointError


def require_file(path: Path, why: str) -> Path:
    if not path.is_file():
        present = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise SAEFormatError(f"{path}: missing file, expected {path.name} ({why}); found {present or 'nothing'}")
    return path


def read_json(path: Path) -> dict[str, Any]:
    require_file(path, "the checkpoint's config")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEFormatError(f"{path}: not valid JSON ({e}); expected the checkpoint's config object") from e
    if not isinstance(data, dict):
        raise SAEFormatError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the string metadata of a safetensors file."""
    require_file(path, "the checkpoint's weights")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise SAEFormatError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); the file is truncated or "
            f"not safetensors: download it again or convert it"
        ) from e
    return tensors, metadata


def read_torch_weights(path: Path) -> Any:
    """A torch pickle loaded with weights_only=True onto the CPU; other objects are refused."""
    require_file(path, "the checkpoint's weights")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: holds objects other than tensors and plain containers, which safe loading refuses "
            f"(expected a dict of tensors). Only load it if you trust it, re-save its state_dict, "
            f"then convert that. Detail: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise SAEFormatError(
            f"{path}: not a readable torch file ({type(e).__name__}: {e}); the file is truncated or corrupt"
        ) from e


def take(tensors: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise SAEFormatError(f"{path}: missing tensor {key!r}; found keys {sorted(tensors)}")
    value = tensors[key]
    if not isinstance(value, torch.Tensor):
        raise SAEFormatError(f"{path}: {key!r} should be a tensor, found {type(value).__name__}")
    return value


def cfg_int(cfg: dict[str, Any], key: str, path: Path, *, default: Any = ...) -> Any:
    if key not in cfg:
        if default is ...:
            raise SAEFormatError(f"{path}: missing key {key!r}; found keys {sorted(cfg)}")
        return default
    value = cfg[key]
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise SAEFormatError(f"{path}: key {key!r} should be an integer, found {value!r}")
    return value


def check_width(path: Path, key: str, cfg_value: int, tensor_name: str, tensor_value: int) -> None:
    if cfg_value != tensor_value:
        raise SAEFormatError(
            f"{path}: config says {key}={cfg_value} but tensor {tensor_name!r} has {tensor_value}; "
            f"the config and the weights belong to different SAEs"
        )
