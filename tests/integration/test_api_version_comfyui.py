"""Why the nodes import comfy_api.latest and not a numbered version (README "ComfyUI versions").

A pin is worth something only if the numbered module freezes the schema classes. In 0.3.64 (and in the
newer backends read for this, where v0_0_3 exists too) the numbered packages re-export latest's io/ui
objects themselves: ``comfy_api.v0_0_2.io is comfy_api.latest.io``. Pinning would change no class and
only add a module that may be dropped. When this test fails, a numbered version has become a real
frozen copy: then pin to the oldest one that has every class the pack uses.
"""

import importlib

import pytest


@pytest.mark.parametrize("version", ["v0_0_2", "v0_0_3"])
def test_numbered_v3_api_is_latest_itself(version):
    latest = importlib.import_module("comfy_api.latest")
    try:
        numbered = importlib.import_module(f"comfy_api.{version}")
    except ImportError:
        pytest.skip(f"comfy_api.{version} is not in this ComfyUI")
    assert numbered.io is latest.io
    assert getattr(numbered, "ComfyExtension", latest.ComfyExtension) is latest.ComfyExtension
    ui = getattr(numbered, "ui", None)
    assert ui is None or ui is latest.ui
