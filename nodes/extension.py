"""The pack's ComfyUI V3 extension: the node list and the entry point ComfyUI calls. The nodes are thin adapters in
the *_nodes modules (the math is in sae_core, the sampler glue in hook.py)."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import ComfyExtension, io

from . import folders
from .common import prompt_server
from .concept_nodes import LearnConcept, LoadConcept, SaveConcept
from .edit_nodes import PatchReplacer, SAESteer
from .preview_nodes import Compare, MaskPreview
from .sae_nodes import ConceptDetectorNode, LoadSAE
from .templates import register_thumbnail_route
from .train_nodes import NODES as TRAIN_NODES

NODES = [LoadSAE, ConceptDetectorNode, PatchReplacer, SAESteer, MaskPreview, LearnConcept, SaveConcept,
         LoadConcept, Compare, *TRAIN_NODES]


class SAEExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> SAEExtension:
    folders.register(folder_paths)
    return SAEExtension()


def _serve_thumbnails() -> None:
    """Template thumbnails at the URL the frontend asks, on old and new backends (see nodes/templates.py)."""
    server = prompt_server()
    if server is not None:
        register_thumbnail_route(server, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


folders.register(folder_paths)  # also at import, so the lists in define_schema see the folders
_serve_thumbnails()
