"""Atomic safetensors writes with the permissions any other new file gets (0666 minus the umask)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it, so set it back at once, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``tensors`` to ``path`` through a temporary file in the same folder, then rename it into place:
    never a half-written file under the final name. safetensors creates files 0600; the result gets the mode
    of a normally created file (0644 under the usual umask 022), so others sharing the ComfyUI can read it."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, os.fspath(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
