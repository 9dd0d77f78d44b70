"""Atomic file writes: a unique temporary file beside the target, fsync, rename; the old file intact on failure.

Every file the pack writes goes through ``atomic_write``: a crash, a full disk or an exception in the middle
of writing leaves the previous file (if any) exactly as it was and no temporary file behind. New files get
the usual permissions (0666 minus the umask, so 0644 on most systems), not the 0600 of ``tempfile.mkstemp``:
shared ComfyUI installs need other users to read them; a replaced file keeps its own permissions.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Callable

from .errors import SAEError, SAEPathError, SAEWriteError

# Longest file name most filesystems accept (bytes); the temporary name adds a few characters to it.
NAME_MAX = 255
_TMP_EXTRA = len(".") + 16 + len(".tmp") + 1


def recorded_path(path: Path, root: Path) -> str:
    """``path`` as a file that others read records it: relative to ``root`` when inside it, else its bare name (no
    machine's folders in shared files)."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return Path(path).name


def check_file_name(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path, refused with SAEPathError when no filesystem could hold it (NUL byte, name too long)."""
    text = os.fspath(path)
    if "\x00" in text:
        raise SAEPathError(f"{what} {text!r}: the name holds a NUL byte, which no file name may contain; remove it")
    p = Path(text)
    try:
        length = len(os.fsencode(p.name))
    except UnicodeError as e:
        raise SAEPathError(f"{what} {text!r}: the name cannot be encoded for this filesystem ({e})") from e
    if length + _TMP_EXTRA > NAME_MAX:
        raise SAEPathError(
            f"{what} {text!r}: the file name is {length} bytes long, expected at most {NAME_MAX - _TMP_EXTRA}; "
            "choose a shorter name"
        )
    return p


def check_folder(path: str | os.PathLike, what: str = "file") -> None:
    """Refuse a destination whose folder (or a folder above it) is an existing file, before any work is done."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SAEWriteError(f"{path}: {parent} is a file, not a folder; expected a folder to write the {what} into")
            return


def _new_temp(directory: Path, name: str) -> tuple[int, Path]:
    """An exclusive new file beside the target: mode 0666 & ~umask (what ``open(path, 'w')`` would give)."""
    for _ in range(100):
        tmp = directory / f".{name[:NAME_MAX - _TMP_EXTRA - 1]}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise SAEWriteError(f"{directory}: could not create a unique temporary file for {name}")


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):  # some filesystems refuse to open or sync a directory: the rename stands
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, what: str = "file") -> Path:
    """Run ``write(tmp)`` to fill a temporary file beside ``path``, then move it over ``path`` atomically.

    ``write`` receives the temporary path (it exists, empty) and may open it any way it likes. Any failure,
    including an exception raised by ``write``, removes the temporary file and leaves ``path`` untouched;
    OS-level failures (disk full, permission, file too large) become SAEWriteError naming ``path``.
    """
    path = check_file_name(path, what)
    directory = path.parent if str(path.parent) else Path(".")
    check_folder(path, what)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = _new_temp(directory, path.name)
    except SAEError:
        raise
    except OSError as e:
        raise SAEWriteError(f"{path}: cannot create a file in {directory} ({e.strerror or e}); check the folder "
                            "exists and is writable") from e
    try:
        # what open(path, "w") would give: 0666 minus the umask, read off the file O_CREAT just made (no umask race)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    try:
        with contextlib.suppress(FileNotFoundError):  # a replaced file keeps its permissions
            mode = stat.S_IMODE(os.stat(path).st_mode)
        write(tmp)
        # writers may recreate the file (safetensors does, with 0600): set the mode on what they left
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, SAEError) or not isinstance(e, Exception):
            raise
        if isinstance(e, OSError):
            reason = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is larger than allowed",
                      errno.EACCES: "permission denied", getattr(errno, "EDQUOT", -1): "the disk quota is exceeded"}.get(
                e.errno, e.strerror or str(e))
        else:  # writers such as safetensors raise their own types for the same OS failures
            reason = f"{type(e).__name__}: {e}"
        raise SAEWriteError(f"{path}: writing the {what} failed ({reason}); the previous file, if any, is "
                            "unchanged. Free space or pick another folder, then try again") from e
    _fsync_dir(directory)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, what: str = "file") -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write, what=what)


def atomic_write_text(path: str | os.PathLike, text: str, *, what: str = "file") -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), what=what)
