"""Model folders models/sae and models/sae_concepts: registration with extension filters, listing, lookup."""

from __future__ import annotations

import os
from pathlib import Path, PureWindowsPath

try:
    from ..sae_core.errors import SAEFileNotFoundError, SAEPathError, SAEWriteError
    from ..sae_core.files import check_file_name
    from ..sae_core.formats import find_checkpoints
except ImportError:  # imported as top-level `nodes`
    from sae_core.errors import SAEFileNotFoundError, SAEPathError, SAEWriteError
    from sae_core.files import check_file_name
    from sae_core.formats import find_checkpoints

SAE_FOLDER = "sae"
CONCEPT_FOLDER = "sae_concepts"
EXTENSIONS = {SAE_FOLDER: {".safetensors"}, CONCEPT_FOLDER: {".safetensors"}}
DIR_SUFFIX = "/"  # listed format directories end with this, files never do


def register(folder_paths) -> None:
    """Add models/<name> with our extension filter, keeping paths extra_model_paths.yaml already added."""
    for name, exts in EXTENSIONS.items():
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, _ = folder_paths.folder_names_and_paths[name]
            paths = list(paths)
            if default not in paths:
                paths.append(default)
        else:
            paths = [default]
        folder_paths.folder_names_and_paths[name] = (paths, set(exts))


def list_sae_entries(folder_paths) -> list[str]:
    """Native files (``x.safetensors``) and format directories (``dir/``) under every models/sae path."""
    dirs: list[str] = []
    inside: set[Path] = set()
    for root in folder_paths.get_folder_paths(SAE_FOLDER):
        r = Path(root)
        if not r.is_dir():
            continue
        for d in find_checkpoints(r):
            inside.add(d.resolve())
            rel = d.relative_to(r).as_posix()
            dirs.append((rel if rel != "." else r.name) + DIR_SUFFIX)
    files = []
    for f in folder_paths.get_filename_list(SAE_FOLDER):
        full = folder_paths.get_full_path(SAE_FOLDER, f)
        if full and Path(full).resolve().parent not in inside:
            files.append(f)
    return sorted(set(files)) + sorted(set(dirs))


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` lies in ``root`` once '..' is normalised away: a list entry must never leave models/sae.

    Symlinks are not resolved: a link placed inside the folder is the user's own choice and stays allowed."""
    p, r = os.path.normcase(os.path.abspath(path)), os.path.normcase(os.path.abspath(root))
    try:
        return os.path.commonpath([p, r]) == r
    except ValueError:  # different drives
        return False


def resolve_sae_entry(folder_paths, entry: str) -> str:
    """Full path of a Load SAE list entry; only entries inside a models/sae folder are accepted."""
    roots = [Path(r) for r in folder_paths.get_folder_paths(SAE_FOLDER)]
    if not isinstance(entry, str) or not entry or "\x00" in entry:
        raise SAEPathError(f"SAE {entry!r}: expected the name of an entry of models/{SAE_FOLDER} as listed by Load SAE")
    rel = entry[: -len(DIR_SUFFIX)] if entry.endswith(DIR_SUFFIX) else entry
    parts = Path(rel).parts
    if Path(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or ".." in parts or ".." in PureWindowsPath(rel).parts:
        raise SAEPathError(
            f"SAE {entry!r}: expected a name relative to models/{SAE_FOLDER} ({[str(r) for r in roots]}), found a path "
            "that leaves it; put the SAE into that folder (a symlink inside it works) and pick it from the list"
        )
    if entry.endswith(DIR_SUFFIX):
        for root in roots:
            cand = root / rel
            if cand.is_dir() and _inside(cand, root):
                return str(cand)
            if root.name == rel and root.is_dir():
                return str(root)
    else:
        full = folder_paths.get_full_path(SAE_FOLDER, entry)
        if full and any(_inside(Path(full), r) for r in roots):
            return full
    raise SAEFileNotFoundError(
        f"SAE {entry!r} not found under models/{SAE_FOLDER} ({folder_paths.get_folder_paths(SAE_FOLDER)}); "
        "refresh the node list (press r) or put the file there"
    )


def sae_save_path(folder_paths, name: str) -> str:
    """models/sae/<name>.safetensors (first registered path); refuses names that leave the folder."""
    stem = name.strip()
    if stem.endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem or "/" in stem or "\\" in stem or stem.startswith("."):
        raise ValueError(f"SAE file name {name!r}: expected a plain name like 'my_sae' (no folders, not hidden)")
    root = folder_paths.get_folder_paths(SAE_FOLDER)[0]
    os.makedirs(root, exist_ok=True)
    return os.path.join(root, stem + ".safetensors")


def concept_save_path(folder_paths, name: str) -> str:
    """models/sae_concepts/<name>.safetensors (first registered path); refuses names that leave the folder."""
    stem = name.strip()
    if stem.endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem or "/" in stem or "\\" in stem or stem.startswith(".") or ":" in stem:
        raise SAEPathError(f"concept file name {name!r}: expected a plain name like 'cat' (no folders, not hidden)")
    if any(ord(c) < 32 for c in stem):
        raise SAEPathError(f"concept file name {name!r}: holds a control character (NUL, newline, ...); expected a "
                           "plain name like 'cat'")
    root = folder_paths.get_folder_paths(CONCEPT_FOLDER)[0]
    path = os.path.join(root, stem + ".safetensors")
    check_file_name(path, "concept file name")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise SAEWriteError(f"{root}: cannot create the concept folder ({e.strerror or e}); check permissions") from e
    return path
