"""Exception types of the core; every message names the file or key, what was expected and what was found.

One hierarchy: every error the pack raises on purpose is an ``SAEError``, itself a ``ValueError`` so callers
that catch ``ValueError`` keep working. Kinds that callers used to meet as a builtin type (a missing file, an
unknown name, a refused pickle) also derive from that builtin. Every class reports its module as ``sae_core``
so a host that shows ``module.Type`` (ComfyUI does) prints ``sae_core.BlockMismatchError``, not an internal
path; all of them are importable from ``sae_core``.
"""

from __future__ import annotations


class SAEError(ValueError):
    """Base class for every error the pack raises on purpose."""


class SAEConfigError(SAEError):
    """A configuration value is missing, unknown or inconsistent."""


class SAEFormatError(SAEError):
    """A checkpoint's files or layout are missing, unreadable or not of a known format."""


class SAEShapeError(SAEFormatError):
    """A tensor's shape does not fit the configuration or another tensor."""


class SAENonFiniteError(SAEFormatError):
    """A tensor holds NaN or inf values."""


class UnsafeCheckpointError(SAEFormatError):
    """A pickled file holds objects that safe (weights_only) loading refuses."""


class TrustRequiredError(SAEError, PermissionError):
    """A file can only be read by unpickling it, which the caller has not vouched for."""


class SAEInputError(SAEError):
    """A value handed to a core function or a node (a setting, a tensor, a name) is out of its domain."""


class SAETypeError(SAEInputError, TypeError):
    """A value handed to a core function has the wrong type."""


class SAEStateError(SAEError, RuntimeError):
    """An object is used before it was set up (e.g. a step holder without a step)."""


class SAELookupError(SAEError, KeyError):
    """A name (concept, branch, module, node) is not among the known ones."""

    def __str__(self) -> str:  # KeyError's str() quotes the message; show it as written
        return str(self.args[0]) if self.args else ""


class SAEFileNotFoundError(SAEError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class SAEFileExistsError(SAEError, FileExistsError):
    """A file would be overwritten without the user's consent."""


class SAEWriteError(SAEError, OSError):
    """Writing a file failed (disk full, no permission, file too large); the old file is left intact."""


class SAEPathError(SAEInputError):
    """A file name or path is not acceptable (leaves its folder, holds a NUL byte, is too long)."""


# -- the registry of hook points ----------------------------------------------------------------


class BlockError(SAEError):
    """Base class of the block registry's errors."""


class UnknownFamilyError(BlockError):
    """The model family is not one the registry knows."""


class UnknownBlockError(BlockError):
    """The name is not a hookable SpatialTransformer of the family (or of any family)."""


class AmbiguousBlockError(BlockError):
    """The name exists in several families and nothing says which one is meant."""


class BlockMismatchError(BlockError):
    """An SAE's input width does not match the channels of the block it is meant for."""


# -- concept dictionaries -----------------------------------------------------------------------


class ConceptFileError(SAEError):
    """A concept file is not readable as a concept dictionary (wrong format, keys, shapes, values)."""


class ConceptMismatchError(SAEError):
    """A concept dictionary is used with an SAE it was not learned with."""


# -- small checks shared by the settings dataclasses ---------------------------------------------


def require_number(where: str, value, *, minimum: float | None = None, finite: bool = True) -> float:
    """``value`` as a float, refused with SAEInputError unless it is a real number (not a bool) in range."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_scalar_tensor(value):
        raise SAEInputError(f"{where} is {value!r}, expected a number")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise SAEInputError(f"{where} is {value!r}, expected a number") from e
    if finite and not math.isfinite(out):
        raise SAEInputError(f"{where} is {value!r}, expected a finite number")
    if minimum is not None and not out >= minimum:
        raise SAEInputError(f"{where} is {value!r}, expected a number >= {minimum:g}")
    return out


def require_int(where: str, value, *, minimum: int | None = None) -> int:
    """``value`` as an int, refused with SAEInputError unless it is a whole number (not a bool) >= minimum."""
    if isinstance(value, bool):
        raise SAEInputError(f"{where} is {value!r}, expected an integer")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if _is_scalar_tensor(value) and not value.is_floating_point():
        value = int(value)
    if not isinstance(value, int):
        raise SAEInputError(f"{where} is {value!r}, expected an integer")
    if minimum is not None and value < minimum:
        raise SAEInputError(f"{where} is {value!r}, expected an integer >= {minimum}")
    return value


def _is_scalar_tensor(value) -> bool:
    return type(value).__name__ == "Tensor" and getattr(value, "numel", lambda: 0)() == 1


for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, SAEError):
        _cls.__module__ = "sae_core"
del _cls

__all__ = [name for name, value in dict(globals()).items() if isinstance(value, type) and issubclass(value, SAEError)]
