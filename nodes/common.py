"""What the pack's nodes share: the category, the socket types, the detector spec, the block list, messages to the UI."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from comfy_api.latest import io

from ..sae_core.blocks import FAMILIES, blocks
from ..sae_core.detect import ConceptDetector
from ..sae_core.mixins import SharedOnCopy

logger = logging.getLogger(__name__)


CATEGORY = "SAE"
FROM_FILE = "from file"
CONTRAST_LABEL = "__contrast__"
KEEP_LABEL = "__keep__"  # concept file meta: the keep prompts (sampled as contrast, checked one by one)
BRANCH_OPTIONS = ("both", "cond", "uncond")

SAEType = io.Custom("SAE")
ConceptType = io.Custom("SAE_CONCEPT")
DetectorType = io.Custom("SAE_DETECTOR")
DetectionsType = io.Custom("SAE_DETECTIONS")


@dataclass(frozen=True)
class DetectorSpec(SharedOnCopy):
    """What a Concept Detector hands to Patch Replacer / SAE Steer.

    Shared on copy: it holds the SAE, whose weights a deep copy (of model_options, say) must never duplicate.
    """

    sae: object
    detector: ConceptDetector
    branches: str
    start_percent: float
    end_percent: float


def block_names() -> list[str]:
    names = []
    for fam in FAMILIES:
        for spec in blocks(fam):
            if spec.diffusers not in names:
                names.append(spec.diffusers)
    return names


WARNING_EVENT = "sae_concept_eraser.warning"  # websocket event the frontend extension shows as a toast


def prompt_server():
    """ComfyUI's running PromptServer, or None (no server: tests, scripts). Never imports the server module:
    ComfyUI's main has imported it before it loads custom nodes."""
    module = sys.modules.get("server")
    cls = getattr(module, "PromptServer", None)
    return getattr(cls, "instance", None)


def node_id_of(cls):
    hidden = getattr(cls, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None


def tell(node_id, text: str, level: int = logging.WARNING) -> None:
    """Log ``text`` and show it under the node in the UI (a toast too when it is a warning)."""
    logger.log(level, "%s", text)
    try:
        server = prompt_server()
        if server is None:
            return
        if level >= logging.WARNING:
            server.send_sync(WARNING_EVENT, {"node": node_id, "text": text})
        if node_id is not None and hasattr(server, "send_progress_text"):
            server.send_progress_text(text, node_id)
    except Exception as e:  # outside a server (tests, scripts) the log line is the message
        logger.debug("could not show the message in the UI: %s", e)
