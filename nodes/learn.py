"""Learn Concept pieces that need no ComfyUI: prompt parsing and the default contrast set.

The recording itself is sae_core.collector.ConceptCollector, installed with nodes/hook.py.
"""

from __future__ import annotations

import re

import torch

try:  # inside ComfyUI the pack is a package and sae_core its sibling
    from ..sae_core.errors import SAEInputError
except ImportError:  # imported as top-level `nodes`
    from sae_core.errors import SAEInputError

# Generic scenes of many kinds: SAeUron's mu_notc is "everything else", and a varied set keeps one
# contrast prompt from dominating the score of latents that merely encode photo style or layout.
# A concept's own words are never in the contrast set it is scored against: default_contrast() drops
# the scenes that name it (the cat scene when learning "cat").
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


# Words that say nothing about what is in the picture: never treated as the concept's words.
_GENERIC = frozenset(
    "a an the of on in at to and or with without by for from into over under near photo photograph picture image "
    "painting drawing render style portrait shot view scene close up closeup high quality detailed concept".split()
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _stem(word: str) -> str:
    """Crude singular: cats -> cat, boxes -> box, puppies -> puppy (enough to match a concept in a prompt)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith(("xes", "ches", "shes", "ses")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def concept_words(name: str, prompts: list[str]) -> set[str]:
    """The concept's words: those of its name, and those every concept prompt shares (generic words left out)."""
    words = {_stem(w) for w in _words(name.replace("_", " "))}
    if prompts:
        common = set.intersection(*({_stem(w) for w in _words(p)} for p in prompts))
        words |= common
    return {w for w in words if w not in _GENERIC and len(w) > 1}


def prompts_naming(prompts, words: set[str]) -> list[str]:
    """The prompts that contain one of ``words`` (singular or plural)."""
    return [p for p in prompts if words & {_stem(w) for w in _words(p)}]


def default_contrast(name: str, prompts: list[str]) -> tuple[list[str], list[str]]:
    """(built-in contrast prompts without the concept's words, the ones dropped because they name it)."""
    dropped = prompts_naming(DEFAULT_CONTRAST, concept_words(name, prompts))
    return [p for p in DEFAULT_CONTRAST if p not in dropped], dropped


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


def keep_negatives(accumulator, keep_samples, timesteps: torch.Tensor) -> torch.Tensor:
    """[G, T, M] float64: per keep prompt (the sample id of its sampling run) the firing rates over its kept images
    at ``timesteps``, the hard negatives of the 'specific' rule (a latent must stay silent on each on its own)."""
    groups = []
    for sample in keep_samples:
        keys = [k for k in accumulator.samples if k[1] == sample]
        if not keys:
            raise SAEInputError(f"Learn Concept: no images were recorded for keep prompt run {sample}; "
                                f"recorded runs are {sorted({k[1] for k in accumulator.samples})}")
        groups.append(keys)
    return accumulator.group_rates(groups, timesteps)


def steps_without_latents(concept, index: int = 0) -> list[int]:
    """The timestep indices where concept ``index`` of a dictionary selects no latent (nothing detected there)."""
    return [t for t in range(concept.latents.shape[1]) if not bool((concept.latents[index, t] >= 0).any())]
