"""The tracked files carry no path of a development machine and cite no repository file that does not exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Files that still hold a machine path, each with the reason; remove an entry as soon as the file is fixed
# (test_allow_list_is_current fails when an entry is no longer needed, so the list only shrinks).
MACHINE_PATH_ALLOWED: dict[str, str] = {}  # file -> why it may still hold one (none today)

# An absolute path under a folder that only exists on some machine: /work/..., /root/..., /home/<user>/...,
# /tmp/..., /Users/..., /mnt/..., or a Windows user folder. Not inside a URL or a longer path
# (the character before the slash may not be a name character, a dot, a colon or a slash).
MACHINE_PATH = re.compile(r"(?<![\w.:/~-])/(?:work|root|home|tmp|Users|mnt|scratch)/|[A-Za-z]:\\Users\\")

# A relative path into one of the repository's folders ending in a file extension, or a bare Markdown file name.
TOP_DIRS = ("sae_core", "nodes", "js", "tests", "bench", "tools", "docs", "shapes_world", "example_workflows", ".ci")
REPO_FILE = re.compile(
    r"(?<![\w./-])((?:%s)/[\w./-]*?\.(?:py|js|mjs|md|json|png|jpg|svg|safetensors|toml))(?![\w-])"
    % "|".join(re.escape(d) for d in TOP_DIRS)
)
REPO_DIR = re.compile(r"(?<![\w./-])((?:%s)/(?:[\w-]+/)*)(?=[\s`'\")\],;:]|$)" % "|".join(re.escape(d) for d in TOP_DIRS))
MARKDOWN = re.compile(r"(?<![\w./-])([A-Za-z_][\w-]*\.md)\b")
SELF = "tests/test_repo_hygiene.py"  # its examples below are the patterns' test data
BINARY = (".png", ".jpg", ".jpeg", ".safetensors", ".pt", ".pth", ".ico", ".webp")


def texts(tracked_files):
    for rel in tracked_files:
        path = ROOT / rel
        if rel == SELF or rel.endswith(BINARY) or not path.is_file():
            continue
        yield rel, path.read_text(encoding="utf-8", errors="replace")


def machine_paths(text: str) -> list[str]:
    return [f"line {text.count(chr(10), 0, m.start()) + 1}: {text[m.start():m.start() + 40].splitlines()[0]}"
            for m in MACHINE_PATH.finditer(text)]


def test_no_development_machine_paths(tracked_files):
    found = {rel: hits for rel, text in texts(tracked_files) if rel not in MACHINE_PATH_ALLOWED and (hits := machine_paths(text))}
    assert not found, (
        "absolute paths of a development machine in tracked files (take locations from arguments or environment "
        f"variables, write relative paths in docs): {found}"
    )


def test_allow_list_is_current(tracked_files):
    present = dict(texts(tracked_files))
    stale = {rel: why for rel, why in MACHINE_PATH_ALLOWED.items() if not machine_paths(present.get(rel, ""))}
    assert not stale, f"these files no longer hold a machine path: remove them from MACHINE_PATH_ALLOWED: {stale}"


def test_cited_repository_files_exist(tracked_files):
    files = set(tracked_files)
    dirs = {str(Path(f).parent) + "/" for f in files} | {str(p) + "/" for f in files for p in Path(f).parents}
    names = {Path(f).name for f in files}
    missing = {}
    for rel, text in texts(tracked_files):
        bad = sorted({m for m in REPO_FILE.findall(text) if m not in files}
                     | {m for m in REPO_DIR.findall(text) if m not in dirs}
                     | {m for m in MARKDOWN.findall(text) if m not in names})
        if bad:
            missing[rel] = bad
    assert not missing, f"tracked files cite repository files or folders that do not exist: {missing}"


@pytest.mark.parametrize("text, hits", [
    ("run with /work/comfyenv/bin/python", 1),
    ("see /root/notes.md and /home/me/x", 2),
    ("cd /tmp/run", 1),
    ("https://example.org/work/page and ~/work/x and a/work/b", 0),
    (r"C:\Users\me\ComfyUI", 1),
])
def test_the_machine_path_pattern(text, hits):
    assert len(machine_paths(text)) == hits


def test_the_reference_patterns():
    text = "see `tests/test_cli.py`, docs/FORMULAS.md section 2, tests/js/ and nodes/hook.install_patch; REFERENCE.md"
    assert REPO_FILE.findall(text) == ["tests/test_cli.py", "docs/FORMULAS.md"]
    assert REPO_DIR.findall(text) == ["tests/js/"]
    assert MARKDOWN.findall(text) == ["REFERENCE.md"]  # a path is checked as a path, a bare name by name
