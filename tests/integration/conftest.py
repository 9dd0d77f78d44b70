"""Integration tests against a real ComfyUI checkout: put it on sys.path, or skip this whole folder.

COMFYUI_PATH names the checkout (no default: unset means skipped; `make test-comfy` refuses to run without it). ComfyUI must be importable
with this interpreter (run with the ComfyUI venv, see README); otherwise nothing here is collected.
"""

import importlib
import os
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")


def _import_comfyui() -> str | None:
    """None when ComfyUI imported, else why not."""
    if not COMFYUI_PATH:
        return "COMFYUI_PATH is not set; point it at a ComfyUI checkout to run these tests"
    if not (pathlib.Path(COMFYUI_PATH) / "comfy").is_dir():
        return f"COMFYUI_PATH={COMFYUI_PATH!r} is not a ComfyUI checkout"
    if COMFYUI_PATH not in sys.path:
        # appended, not prepended: ComfyUI's top-level nodes.py must not shadow the pack's `nodes` package
        # for the tests outside this folder (nothing imported in-process here needs ComfyUI's nodes.py)
        sys.path.append(COMFYUI_PATH)
    try:
        from comfy.cli_args import args

        # before comfy.model_management is imported: it probes devices from these
        args.cpu = True
        args.use_pytorch_cross_attention = True
        importlib.import_module("comfy_api.latest")  # first: it needs the most dependencies (av), fail early
        for name in ("comfy.model_patcher", "comfy.sample", "folder_paths"):
            importlib.import_module(name)
    except Exception as e:  # any missing dependency of ComfyUI means "not importable here"
        # leave no half-imported ComfyUI behind: the repo root's __init__ would see comfy_api and try it
        sys.path.remove(COMFYUI_PATH)
        for name in [n for n in sys.modules if n.split(".")[0] in ("comfy", "comfy_api", "comfy_execution",
                                                                    "folder_paths", "comfy_config", "app")]:
            del sys.modules[name]
        return f"ComfyUI at {COMFYUI_PATH} is not importable with {sys.executable}: {type(e).__name__}: {e}"
    return None


SKIP_REASON = _import_comfyui()
if SKIP_REASON is not None:
    collect_ignore_glob = ["test_*.py"]
else:
    os.environ.setdefault("COMFYUI_PATH", COMFYUI_PATH)  # for tests that start ComfyUI in a subprocess


def pytest_report_header(config):
    return f"ComfyUI integration: {'skipped: ' + SKIP_REASON if SKIP_REASON else COMFYUI_PATH}"


@pytest.fixture(autouse=True)
def inference_mode():
    """ComfyUI executes every node (and so sampling) under torch.inference_mode(); so do these tests."""
    import torch

    with torch.inference_mode():
        yield


@pytest.fixture(scope="session")
def comfy_threads():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sd1(comfy_threads):
    from tiny_unets import build_sd1

    return build_sd1()


@pytest.fixture(scope="session")
def sdxl(comfy_threads):
    from tiny_unets import build_sdxl

    return build_sdxl()


@pytest.fixture(scope="session")
def pack():
    """The repo root imported the way ComfyUI imports a custom node folder (a package; here with its
    entry point, because comfy_api is importable). Use its sae_core too (``pack.sae_core``): classes from
    a second, top-level import of sae_core would fail isinstance checks."""
    import importlib
    import importlib.util

    name = "sae_concept_eraser"
    if name not in sys.modules:
        root = HERE.parents[1]
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    mod = sys.modules[name]
    for sub in ("sae_core", "sae_core.intervention", "sae_core.concepts", "sae_core.detect", "nodes.hook",
                "nodes.extension"):
        importlib.import_module(f"{name}.{sub}")
    return mod
