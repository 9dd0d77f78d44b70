"""ComfyUI entry point of SAE Concept Eraser; a no-op when imported outside ComfyUI (pytest, scripts)."""

import importlib.util

WEB_DIRECTORY = "./js"


def _comfyui_present() -> bool:
    try:
        return importlib.util.find_spec("comfy_api") is not None
    except (ImportError, ValueError):
        return False


# ComfyUI imports this folder as a package (its name may be hyphenated), so the relative import
# works there; under pytest or a plain `import` of this file there is no package and no ComfyUI.
if __package__ and _comfyui_present():
    from .nodes.extension import comfy_entrypoint  # noqa: F401

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"] if "comfy_entrypoint" in globals() else ["WEB_DIRECTORY"]
