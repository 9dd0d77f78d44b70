"""The recording nodes' sampling runs (Learn Concept, Collect Activations): one full sampling per prompt on the
patched model, with one progress bar and cancel between steps; the hook on the model records what it needs."""

from __future__ import annotations

from typing import Callable, Sequence

import comfy.model_management
import comfy.sample
import comfy.utils
import torch


def encode_prompt(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample_prompts(patched, clip, runs: Sequence[tuple[str, int]], negative_prompt: str, width: int, height: int,
                   steps: int, cfg: float, sampler_name: str, scheduler: str, node_id=None,
                   before_run: Callable[[int], None] | None = None) -> None:
    """Sample ``patched`` once per (prompt, seed) of ``runs`` from an empty latent of width x height;
    ``before_run(i)`` is called before run i (e.g. to tell the hook which prompt is sampled)."""
    negative = encode_prompt(clip, negative_prompt)
    pbar = comfy.utils.ProgressBar(len(runs) * steps, node_id=node_id)

    def on_step(*_):
        pbar.update(1)
        comfy.model_management.throw_exception_if_processing_interrupted()

    for i, (prompt, seed) in enumerate(runs):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if before_run is not None:
            before_run(i)
        positive = encode_prompt(clip, prompt)
        latent = torch.zeros([1, 4, height // 8, width // 8])
        latent = comfy.sample.fix_empty_latent_channels(patched, latent)
        noise = comfy.sample.prepare_noise(latent, seed, None)
        comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                            denoise=1.0, callback=on_step, disable_pbar=True, seed=seed)
