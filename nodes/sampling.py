"""The recording nodes' sampling runs (Learn Concept, Collect Activations): one full sampling per prompt on the
patched model, with one progress bar and cancel between steps; the hook on the model records what it needs."""

from __future__ import annotations

from typing import Callable, Sequence

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io


def sampling_inputs(steps_tooltip: str, runs: str, seed_default: int, seed_tooltip: str) -> list:
    """The inputs of ``sample_prompts``'s runs, from width to seed, as the recording nodes show them; ``runs`` ends the
    sampler's and scheduler's tooltips ("used for the recording runs")."""
    return [
        io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width in pixels."),
        io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height in pixels."),
        io.Int.Input("steps", default=20, min=1, max=1000, tooltip=steps_tooltip),
        io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="Classifier-free guidance scale."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                       tooltip=f"Sampler {runs}."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                       tooltip=f"Scheduler {runs}."),
        io.Int.Input("seed", default=seed_default, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                     tooltip=seed_tooltip),
    ]


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
