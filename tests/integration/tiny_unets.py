"""Tiny SD 1.5- and SDXL-architecture ComfyUI models with deterministic random weights, and runners.

Same block indexing as the real UNets (``diffusion_model.output_blocks.4.1`` etc.), depth 1, channel
widths 32/64/128. ComfyUI allocates weights uninitialised (comfy.ops.disable_weight_init), so every
floating tensor is filled from a seeded generator, in sorted key order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SD1_WIDTHS = {"input_blocks.1.1": 32, "input_blocks.4.1": 64, "input_blocks.7.1": 128, "middle_block.1": 128,
              "output_blocks.3.1": 128, "output_blocks.4.1": 128, "output_blocks.5.1": 128,
              "output_blocks.6.1": 64, "output_blocks.9.1": 32}
SDXL_WIDTHS = {"input_blocks.4.1": 64, "input_blocks.7.1": 128, "middle_block.1": 128,
               "output_blocks.0.1": 128, "output_blocks.1.1": 128, "output_blocks.3.1": 64}
CONTEXT = 32
POOLED = 64


class Tiny(NamedTuple):
    model: object  # comfy.model_patcher.ModelPatcher
    family: str
    widths: dict


def _fill(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(module.state_dict(keep_vars=True).items()):
            if not t.dtype.is_floating_point or name.startswith("model_sampling"):
                continue
            if t.ndim > 1:
                t.copy_(torch.randn(t.shape, generator=g) * (0.7 / t[0].numel() ** 0.5))
            elif name.endswith("weight"):  # norm scales
                t.copy_(1.0 + 0.05 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.02 * torch.randn(t.shape, generator=g))


def _patcher(model):
    import comfy.model_patcher

    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def build_sd1(seed: int = 1, dtype: torch.dtype = torch.float32) -> Tiny:
    import comfy.supported_models as sm

    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32,
           "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
           "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
           "context_dim": CONTEXT, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
           "use_temporal_attention": False, "use_temporal_resblock": False}
    mc = sm.SD15(cfg)
    mc.unet_config.update(num_heads=-1, num_head_channels=32)  # SD15 forces 8 heads: 4-wide heads are slow
    mc.set_inference_dtype(dtype, None)
    m = mc.get_model({})
    _fill(m, seed)
    return Tiny(_patcher(m), "sd1", SD1_WIDTHS)


def build_sdxl(seed: int = 2) -> Tiny:
    import comfy.supported_models as sm

    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "num_classes": "sequential", "adm_in_channels": POOLED + 6 * 256, "in_channels": 4,
           "model_channels": 32, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 1, 1],
           "channel_mult": [1, 2, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
           "context_dim": CONTEXT, "num_head_channels": 32, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
           "use_temporal_attention": False, "use_temporal_resblock": False}
    mc = sm.SDXL(cfg)
    mc.set_inference_dtype(torch.float32, None)
    m = mc.get_model({})
    _fill(m, seed)
    return Tiny(_patcher(m), "sdxl", SDXL_WIDTHS)


def conds(family: str, seed: int = 3, tokens: int = 5):
    """(positive, negative) ComfyUI conditioning lists with random embeddings."""
    g = torch.Generator().manual_seed(seed)

    def one():
        extra = {"pooled_output": torch.randn(1, POOLED, generator=g)} if family == "sdxl" else {}
        return [[torch.randn(1, tokens, CONTEXT, generator=g), extra]]

    return one(), one()


def sample(model, family: str, *, width: int = 128, height: int = 96, batch: int = 1, steps: int = 3,
           cfg: float = 4.0, seed: int = 7, sampler: str = "euler", scheduler: str = "normal",
           positive=None, negative=None) -> torch.Tensor:
    """What ComfyUI's KSampler node does (nodes.common_ksampler) on an empty latent; returns the samples.

    ComfyUI's top-level ``nodes`` module is not imported in-process: the pack's own ``nodes`` package
    would shadow it (the server test runs the real KSampler node).
    """
    import comfy.sample

    if positive is None:
        positive, negative = conds(family)
    latent = torch.zeros(batch, 4, height // 8, width // 8)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed, None)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=1.0, disable_pbar=True, seed=seed)
