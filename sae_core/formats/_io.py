"""Safe readers shared by the converters: JSON configs, safetensors files, weights-only torch files."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import SAEFormatError, SAEShapeError, UnsafeCheckpointError


def require_file(path: Path, why: str) -> Path:
    if path.is_dir():
        raise SAEFormatError(f"{path}: is a directory, expected the file {path.name} ({why}); remove or rename it")
    if not path.is_file():
        present = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise SAEFormatError(f"{path}: missing file, expected {path.name} ({why}); found {present or 'nothing'}")
    return path


def read_json(path: Path) -> dict[str, Any]:
    require_file(path, "the checkpoint's config")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise SAEFormatError(f"{path}: cannot read the config ({e.strerror or e}); check its permissions") from e
    except RecursionError as e:
        raise SAEFormatError(f"{path}: the JSON nests too deeply; expected the checkpoint's config object") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEFormatError(f"{path}: not valid JSON ({e}); expected the checkpoint's config object") from e
    if not isinstance(data, dict):
        raise SAEFormatError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the string metadata of a safetensors file."""
    require_file(path, "the checkpoint's weights")
    try:
        text_path = os.fspath(path)
        text_path.encode("utf-8")
    except UnicodeEncodeError:  # a path that is not valid UTF-8: safetensors cannot open it by name
        return _read_safetensors_bytes(path)
    try:
        with safe_open(text_path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except PermissionError as e:
        raise SAEFormatError(f"{path}: cannot read the weights ({e.strerror or e}); check its permissions") from e
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise SAEFormatError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); the file is truncated or "
            f"not safetensors: download it again or convert it"
        ) from e
    return tensors, metadata


def _read_safetensors_bytes(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The same as read_safetensors for a path safetensors cannot take by name (not valid UTF-8)."""
    from safetensors.torch import load

    try:
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n].decode("utf-8")) if len(data) >= 8 + n else None
        metadata = header.get("__metadata__") or {} if isinstance(header, dict) else None
        tensors = load(data)
    except Exception as e:
        raise SAEFormatError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); the file is truncated or "
            f"not safetensors: download it again or convert it"
        ) from e
    if not isinstance(metadata, dict):
        raise SAEFormatError(f"{path}: not a readable safetensors file (no JSON header); download it again")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


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
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError, ... for damaged zip or pickle data
        raise SAEFormatError(
            f"{path}: not a readable torch file ({type(e).__name__}: {e}); the file is truncated or corrupt"
        ) from e


def take(tensors: dict[str, torch.Tensor], key: str, path: Path, ndim: int | None = None) -> torch.Tensor:
    """``tensors[key]``, checked to be a floating-point tensor (of ``ndim`` dimensions when given)."""
    if key not in tensors:
        raise SAEFormatError(f"{path}: missing tensor {key!r}; found keys {sorted(map(str, tensors))}")
    value = tensors[key]
    if not isinstance(value, torch.Tensor):
        raise SAEFormatError(f"{path}: {key!r} should be a tensor, found {type(value).__name__}")
    if ndim is not None and value.ndim != ndim:
        raise SAEShapeError(
            f"{path}: tensor {key!r} has {value.ndim} dimensions (shape {tuple(value.shape)}), expected {ndim}; "
            "the file is damaged or not an SAE checkpoint"
        )
    if not value.is_floating_point():
        raise SAEFormatError(
            f"{path}: tensor {key!r} has dtype {str(value.dtype).replace('torch.', '')}, expected a floating-point "
            "dtype (float32, float16, bfloat16); the file is damaged or not an SAE checkpoint"
        )
    return value


def cfg_int(cfg: dict[str, Any], key: str, path: Path, *, default: Any = ..., positive: bool = True) -> Any:
    if key not in cfg:
        if default is ...:
            raise SAEFormatError(f"{path}: missing key {key!r}; found keys {sorted(cfg)}")
        return default
    value = cfg[key]
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise SAEFormatError(f"{path}: key {key!r} should be an integer, found {value!r}")
    if positive and value is not None and value <= 0 and default is ...:
        raise SAEFormatError(f"{path}: key {key!r} should be a positive integer, found {value!r}")
    return value


def cfg_str(cfg: dict[str, Any], key: str, path: Path, default: str | None) -> str | None:
    """An optional string-valued config key; other types are refused with the key named."""
    value = cfg.get(key, default)
    if value is not None and not isinstance(value, str):
        raise SAEFormatError(f"{path}: key {key!r} should be a string, found {value!r}")
    return value


def check_width(path: Path, key: str, cfg_value: int, tensor_name: str, tensor_value: int) -> None:
    if cfg_value != tensor_value:
        raise SAEFormatError(
            f"{path}: config says {key}={cfg_value} but tensor {tensor_name!r} has {tensor_value}; "
            f"the config and the weights belong to different SAEs"
        )
