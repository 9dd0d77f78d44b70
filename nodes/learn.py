"""Learn Concept pieces that need no ComfyUI: prompt parsing and the default contrast set.

The recording itself is sae_core.intervention.ConceptCollector, installed with nodes/hook.py.
"""

from __future__ import annotations

import re

try:  # inside ComfyUI the pack is a package and sae_core its sibling
    from ..sae_core.errors import SAEInputError
except ImportError:  # imported as top-level `nodes`
    from sae_core.errors import SAEInputError

# Generic scenes of many kinds: SAeUron's mu_notc is "everything else", and a varied set keeps one
# contrast prompt from dominating the score of latents that merely encode photo style or layout.
DEFAULT_CONTRAST = (
    "a photo of a mountain landscape",
    "a busy city street at night",
    "a bowl of fruit on a wooden table",
    "a portrait of a woman smiling",
    "an abstract painting with bright colors",
    "a red car parked on the road",
    "a cat sleeping on a sofa",
    "a plate of pasta",
    "a beach with palm trees",
    "an old castle on a hill",
)


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line; lines starting with '#' are comments."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def parse_latent_ids(text: str) -> list[int]:
    """'12, 40 7' -> [12, 40, 7]."""
    parts = [p for p in re.split(r"[\s,;]+", text.strip()) if p]
    bad = [p for p in parts if not re.fullmatch(r"\d+", p)]
    if bad:
        raise SAEInputError(f"latent ids {text!r}: {bad} are not non-negative integers; type ids like '12, 40, 7'")
    return [int(p) for p in parts]
