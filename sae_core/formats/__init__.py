"""Checkpoint formats: recognise a path's format from the files present and read it into a SparseAutoencoder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .. import blocks
from ..config import ACTIVATIONS, INPUT_SPACES, MODEL_FAMILIES
from ..errors import SAEConfigError, SAEError, SAEFormatError
from ..sae import SparseAutoencoder
from . import finebooru, native, saelens, sparsify, unbox

#: format name -> (marker files that identify it, reader)
LAYOUTS = {
    "sparsify": ((sparsify.CONFIG, sparsify.WEIGHTS), sparsify.read),
    "saelens": ((saelens.CONFIG, saelens.WEIGHTS), saelens.read),
    "unbox": ((unbox.CONFIG, unbox.WEIGHTS), unbox.read),
    "finebooru": ((finebooru.CONFIG, finebooru.WEIGHTS), finebooru.read),  # Krea's FLUX SAEs
}
OVERRIDES = ("activation", "input_space", "hook_point", "model_family", "k")
logger = logging.getLogger(__name__)


def _layout_of(directory: Path) -> str | None:
    for name, (markers, _) in LAYOUTS.items():
        if all((directory / m).is_file() for m in markers):
            if name == "finebooru" and not finebooru.looks_like(directory):
                continue  # config.json + model.safetensors is also a diffusers / transformers model folder
            return name
    return None


def find_checkpoints(directory: Path) -> list[Path]:
    """Directories at or below ``directory`` (two levels) that hold a known layout."""
    found = [directory] if _layout_of(directory) else []
    if not found:
        for child in sorted(p for p in directory.iterdir() if p.is_dir()):
            if _layout_of(child):
                found.append(child)
            else:
                found.extend(g for g in sorted(p for p in child.iterdir() if p.is_dir()) if _layout_of(g))
    return found


def detect_format(path: str | Path) -> tuple[str, Path]:
    """(format name, the file or directory to read) for a user-given path."""
    if not isinstance(path, (str, Path)):
        raise SAEFormatError(f"SAE path: expected a file or directory path, found {type(path).__name__} {path!r}")
    if "\x00" in str(path):
        raise SAEFormatError(f"{str(path)!r}: the path holds a NUL byte, which no file name may contain")
    try:
        return _detect_format(Path(path))
    except OSError as e:  # a name too long, a folder without read permission, a broken mount
        raise SAEFormatError(f"{path}: cannot be read ({e.strerror or e}); expected a readable SAE file or "
                             "checkpoint directory") from e


def _detect_format(path: Path) -> tuple[str, Path]:
    if not path.exists():
        raise SAEFormatError(f"{path}: no such file or directory; expected an SAE file or checkpoint directory")
    if not path.is_file() and not path.is_dir():
        raise SAEFormatError(f"{path}: neither a regular file nor a directory (a device, pipe or socket); expected an "
                             "SAE file or checkpoint directory")
    if path.is_file():
        if path.suffix == ".safetensors" and _layout_of(path.parent) and path.name in (sparsify.WEIGHTS, saelens.WEIGHTS,
                                                                                        finebooru.WEIGHTS):
            return _layout_of(path.parent), path.parent
        if path.name == unbox.WEIGHTS and _layout_of(path.parent) == "unbox":
            return "unbox", path.parent
        if path.suffix == ".safetensors":
            return "native", path
        raise SAEFormatError(
            f"{path}: unrecognised file; expected a native .safetensors SAE file or a checkpoint directory "
            f"holding one of: {_layouts_text()}"
        )
    found = find_checkpoints(path)
    if len(found) == 1:
        return _layout_of(found[0]), found[0]
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(path)) for p in found)
        raise SAEFormatError(f"{path}: holds {len(found)} SAE checkpoints ({names}); pass one of them")
    present = sorted(p.name for p in path.iterdir())
    for config, weights in ((sparsify.CONFIG, (sparsify.WEIGHTS, saelens.WEIGHTS)), (unbox.CONFIG, (unbox.WEIGHTS,))):
        if config in present and (path / config).is_dir():
            raise SAEFormatError(
                f"{path / config}: is a directory, expected the checkpoint's config file {config}; remove or rename it"
            )
        weights_dir = [w for w in weights if w in present and (path / w).is_dir()]
        if config in present and weights_dir:
            raise SAEFormatError(
                f"{path / weights_dir[0]}: is a directory, expected the checkpoint's weights file {weights_dir[0]}"
            )
        if config in present:
            raise SAEFormatError(
                f"{path / config}: found the config but the weights are missing; expected "
                f"{' or '.join(weights)} beside it; found {present}"
            )
    raise SAEFormatError(
        f"{path}: unrecognised layout; expected a directory holding one of: {_layouts_text()}; found {present}"
    )


def _layouts_text() -> str:
    return "; ".join(f"{' + '.join(m)} ({n})" for n, (m, _) in LAYOUTS.items())


def read_checkpoint(path: str | Path):
    """(format, SAEConfig, tensors, resolved path) without building the module."""
    fmt, where = detect_format(path)
    cfg, tensors = native.read(where) if fmt == "native" else LAYOUTS[fmt][1](where)
    return fmt, cfg, tensors, where


def _apply_overrides(cfg, overrides: dict[str, Any], source: Path):
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise SAEConfigError(f"load_sae: unknown overrides {unknown}; allowed: {list(OVERRIDES)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if not changes:
        return cfg
    for key in ("activation", "input_space", "hook_point", "model_family"):
        if key in changes and not isinstance(changes[key], str):
            raise SAEConfigError(f"{source}: override {key}={changes[key]!r} should be a string")
    if "k" in changes and (not isinstance(changes["k"], int) or isinstance(changes["k"], bool) or changes["k"] <= 0):
        raise SAEConfigError(f"{source}: override k={changes['k']!r}; expected a positive integer")
    act = changes.get("activation", cfg.activation)
    if act not in ACTIVATIONS:
        raise SAEConfigError(f"{source}: override activation={act!r} is unknown; expected one of {sorted(ACTIVATIONS)}")
    if "input_space" in changes and changes["input_space"] not in INPUT_SPACES:
        raise SAEConfigError(f"{source}: override input_space={changes['input_space']!r}; expected one of {INPUT_SPACES}")
    if "model_family" in changes and changes["model_family"] not in MODEL_FAMILIES:
        raise SAEConfigError(
            f"{source}: override model_family={changes['model_family']!r}; expected one of {MODEL_FAMILIES}"
        )
    if not ACTIVATIONS[act]:
        changes["k"] = None  # relu / jumprelu keep no top k
    elif "k" not in changes and cfg.k is None:
        raise SAEConfigError(f"{source}: override activation={act!r} needs k, which this checkpoint does not record")
    provenance = dict(cfg.provenance)
    provenance["overrides"] = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cfg.replace(provenance=provenance, **changes)
    except SAEConfigError as e:
        raise SAEConfigError(f"{source}: overrides {provenance['overrides']} are inconsistent: {e}") from e


def _place(cfg, overrides: dict[str, Any], source: Path):
    """Canonical hook point and model family, checked against the SAE's width.

    A family (recorded or overridden) or an overridden hook point must fit the weights exactly; a
    hook point merely recorded by a foreign checkpoint that fits no SD family is kept as it is (the
    SAE may belong to another model) and the nodes refuse it before sampling.
    """
    if cfg.hook_point is None:
        return cfg
    strict = cfg.model_family is not None or overrides.get("hook_point") is not None
    hint = None if strict else cfg.provenance.get("family_hint")
    spec = None
    if hint is not None:
        try:
            spec = blocks.check_sae_fits(cfg.d_in, cfg.hook_point, hint, source=str(source))
        except blocks.BlockError:
            spec = None
    try:
        spec = spec or blocks.check_sae_fits(cfg.d_in, cfg.hook_point, cfg.model_family, source=str(source))
    except blocks.AmbiguousBlockError:
        logger.warning("%s: hook point %r exists in several families; set model_family", source, cfg.hook_point)
        return cfg.replace(hook_point=blocks.canonical_name(cfg.hook_point))
    except blocks.BlockError as e:
        if strict:
            raise
        logger.warning("%s: hook point %r fits no SD 1.x / SDXL block (%s)", source, cfg.hook_point, e)
        return cfg
    provenance = dict(cfg.provenance)
    if spec.diffusers != cfg.hook_point:
        provenance["conversions"] = [*provenance.get("conversions", []), f"hook_point {cfg.hook_point!r} -> {spec.diffusers!r}"]
    return cfg.replace(hook_point=spec.diffusers, model_family=spec.family, provenance=provenance)


def load_sae(path: str | Path, **overrides: Any) -> SparseAutoencoder:
    """Read any supported SAE checkpoint (a native file or a format directory) exactly.

    ``overrides`` set what a format does not record: activation (e.g. 'sigmoid_topk' for G-SAE),
    input_space, hook_point, model_family, k.
    """
    fmt, cfg, tensors, where = read_checkpoint(path)
    cfg = _place(_apply_overrides(cfg, overrides, where), overrides, where)
    tensors = {k: v for k, v in tensors.items() if v is not None}
    try:
        return SparseAutoencoder(cfg, source=str(where), **tensors)
    except SAEError as e:
        if overrides:
            raise type(e)(f"{e} (with overrides {overrides}: they contradict the weights)") from e
        raise


def save_native(sae: SparseAutoencoder, path: str | Path) -> Path:
    """Write ``sae`` as the pack's single-file format (what `convert` writes and Load SAE lists)."""
    return native.write(sae, path)


__all__ = ["LAYOUTS", "OVERRIDES", "detect_format", "find_checkpoints", "load_sae", "read_checkpoint", "save_native"]
