"""What a ComfyUI user gets: the Registry archive holds the node pack only, and the served folder holds no tests.

comfy-cli's `comfy node pack` zips the git-tracked files minus the gitwildmatch patterns of `.comfyignore`
(plus any `[tool.comfy] includes`). The patterns here are restricted to anchored top-level names, so this
test can apply them exactly without comfy-cli.
"""

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What a ComfyUI user needs: the entry point, the nodes, the core they call, the frontend extension, the
# example workflows (ComfyUI lists them as templates), the package metadata ComfyUI reads, README and licence.
# __main__.py: `python custom_nodes/sae-concept-eraser convert ...` from a ComfyUI folder (README "Where files go")
SHIPPED = {"__init__.py", "__main__.py", "nodes", "sae_core", "js", "example_workflows", "pyproject.toml", "README.md",
           "LICENSE"}
ANCHORED = re.compile(r"^/([\w.-]+)(/?)$")


def ignore_patterns() -> list[tuple[str, bool]]:
    """(top-level name, is a folder) per pattern of .comfyignore."""
    patterns = []
    for n, line in enumerate((ROOT / ".comfyignore").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = ANCHORED.match(line)
        assert m, f".comfyignore line {n}: {line!r}; expected an anchored top-level name like /tests/ or /Makefile"
        patterns.append((m.group(1), bool(m.group(2))))
    return patterns


def packed(files: list[str], patterns: list[tuple[str, bool]]) -> list[str]:
    def ignored(path: str) -> bool:
        top, _, rest = path.partition("/")
        return any(top == name and (bool(rest) or not is_dir) for name, is_dir in patterns)

    return [f for f in files if not ignored(f)]


def test_the_archive_holds_only_the_node_pack(tracked_files):
    files = tracked_files
    tops = {f.split("/")[0] for f in packed(files, ignore_patterns())}
    assert tops == SHIPPED, (
        f"the Registry archive would hold {sorted(tops - SHIPPED)} beyond the node pack and lack "
        f"{sorted(SHIPPED - tops)}; list developer-only entries in .comfyignore, or add a needed one to SHIPPED"
    )
    assert not [f for f in packed(files, ignore_patterns()) if re.search(r"(^|/)(tests?/|test_[^/]*\.py$)|\.test\.m?js$", f)]


def test_the_packing_rule_can_fail():
    files = ["spec/test_x.py", "Makefile", "pkg/a.py", "notes/x/y.md", "Makefile.d/x"]
    assert packed(files, [("spec", True), ("Makefile", False), ("notes", True)]) == ["pkg/a.py", "Makefile.d/x"]
    assert packed(files, [("Makefile", True)]) == files  # /Makefile/ matches a folder only


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield ("." * node.level) + node.module


def test_shipped_code_needs_nothing_that_is_left_out():
    left_out = {name for name, _ in ignore_patterns()}
    offenders = []
    for py in sorted([ROOT / "__init__.py", *(ROOT / "nodes").rglob("*.py"), *(ROOT / "sae_core").rglob("*.py")]):
        for mod in _imports(py):
            if mod.lstrip(".").split(".")[0] in left_out:
                offenders.append(f"{py.relative_to(ROOT)} imports {mod}")
    assert not offenders, offenders


def test_served_web_directory_holds_no_tests(tracked_files):
    served = [f for f in tracked_files if f.startswith("js/")]
    assert served and all(f.endswith(".js") and "test" not in f for f in served), served


def test_icon_is_a_square_svg_in_the_repository():
    text = (ROOT / "pyproject.toml").read_text()
    icon = re.search(r'^Icon = "([^"]*)"', text, re.M).group(1)
    repo = re.search(r'^Repository = "https://github.com/([^"]+)"', text, re.M).group(1)
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert icon.startswith(prefix), f"[tool.comfy] Icon is {icon!r}; expected a file of this repository under {prefix}"
    svg = ET.parse(ROOT / icon.removeprefix(prefix)).getroot()
    w, h = int(svg.get("width")), int(svg.get("height"))
    assert w == h <= 400  # the Registry asks for a square icon of at most 400 x 400
