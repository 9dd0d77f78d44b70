"""The core never imports ComfyUI, and the repo root imports cleanly without it."""

import ast
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BANNED = {"comfy", "comfy_api", "folder_paths"}


def _imported_roots(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_sae_core_imports_no_comfyui():
    offenders = []
    for path in sorted((ROOT / "sae_core").rglob("*.py")):
        bad = BANNED.intersection(_imported_roots(path))
        if bad:
            offenders.append(f"{path.relative_to(ROOT)}: {sorted(bad)}")
    assert not offenders, "sae_core must stay ComfyUI-free:\n" + "\n".join(offenders)


def test_import_guard_catches_a_banned_import(tmp_path):
    # The scanner itself must be able to fail.
    p = tmp_path / "x.py"
    p.write_text("import comfy.model_patcher\nfrom folder_paths import get_full_path\n")
    assert BANNED.intersection(_imported_roots(p)) == {"comfy", "folder_paths"}


def test_root_init_imports_under_hyphenated_name_without_comfyui(monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy_api", None)  # find_spec -> ValueError/None: "absent"
    for name in ("sae-concept-eraser", "sae_concept_eraser"):
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.WEB_DIRECTORY == "./js"
        assert not hasattr(module, "comfy_entrypoint")
