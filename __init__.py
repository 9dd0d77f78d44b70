"""ComfyUI entry point of SAE Concept Eraser; a no-op when imported outside ComfyUI (pytest, scripts)."""

import importlib.util
import sys

WEB_DIRECTORY = "./js"
PUBLIC_NAME = "sae_concept_eraser"  # how our exception types are named in ComfyUI's error dialog


def _comfyui_present() -> bool:
    try:
        return importlib.util.find_spec("comfy_api") is not None
    except (ImportError, ValueError):
        return False


# ComfyUI imports this folder as a package (its name may be hyphenated), so the relative import
# works there; under pytest or a plain `import` of this file there is no package and no ComfyUI.
def clean_error_names(package: str, public: str = PUBLIC_NAME) -> list[str]:
    """ComfyUI imports a custom node folder under its file path, so the error dialog would name our exception
    types ``<path>/custom_nodes/sae-concept-eraser.sae_core.blocks.BlockError``. Give every exception class of
    the package's loaded modules the module name ``sae_concept_eraser.<submodule>`` instead. Returns the new names."""
    if package == public:
        return []
    renamed = []
    prefix = package + "."
    for name, mod in list(sys.modules.items()):
        if not name.startswith(prefix) or mod is None:
            continue
        for obj in list(vars(mod).values()):
            if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == name:
                obj.__module__ = public + name[len(package):]
                renamed.append(f"{obj.__module__}.{obj.__qualname__}")
    return renamed


if __package__ and _comfyui_present():
    from .nodes.extension import comfy_entrypoint  # noqa: F401

    clean_error_names(__package__)

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"] if "comfy_entrypoint" in globals() else ["WEB_DIRECTORY"]
