"""Tiny FLUX- and SD3-architecture ComfyUI models (ComfyUI's own classes, deterministic random weights), and conds.

FLUX: hidden 64, 2 heads, 2 double + 2 single blocks, 16 latent channels, 2x2 patches; schnell-like (no
guidance embedding, flow sampling) or dev-like (guidance embedding, FLUX sampling). SD3: MMDiT with hidden
64 (depth 1 sets the width, 64 per unit), 3 joint blocks. Blocks are named as in the real models
(``diffusion_model.double_blocks.1``, ``single_blocks.0``, ``joint_blocks.1``).
"""

from __future__ import annotations

import torch
from tiny_unets import Tiny, _fill, _patcher

CONTEXT = 32
POOLED = 24
WIDTH = 64


def build_flux(seed: int = 11, guidance: bool = False, dtype: torch.dtype = torch.float32) -> Tiny:
    import comfy.supported_models as sm

    cfg = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": POOLED,
           "context_in_dim": CONTEXT, "hidden_size": WIDTH, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
           "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
           "guidance_embed": guidance}
    mc = (sm.Flux if guidance else sm.FluxSchnell)(cfg)
    mc.set_inference_dtype(dtype, None)
    m = mc.get_model({})
    _fill(m, seed)
    widths = {**{f"double_blocks.{i}": WIDTH for i in range(2)}, **{f"single_blocks.{i}": WIDTH for i in range(2)}}
    return Tiny(_patcher(m), "flux", widths)


def build_sd3(seed: int = 12) -> Tiny:
    import comfy.supported_models as sm

    cfg = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "num_blocks": 3,
           "adm_in_channels": POOLED, "input_size": None, "pos_embed_scaling_factor": None,
           "pos_embed_max_size": 48, "num_patches": 48 * 48, "x_block_self_attn_layers": [],
           "context_embedder_config": {"target": "torch.nn.Linear",
                                       "params": {"in_features": CONTEXT, "out_features": WIDTH}}}
    mc = sm.SD3(cfg)
    mc.set_inference_dtype(torch.float32, None)
    m = mc.get_model({})
    _fill(m, seed)
    return Tiny(_patcher(m), "sd3", {f"joint_blocks.{i}": WIDTH for i in range(3)})


def dit_conds(seed: int = 13, tokens: int = 5, guidance: float | None = None):
    """(positive, negative) conditioning with random text embeddings and pooled vectors."""
    g = torch.Generator().manual_seed(seed)

    def one():
        extra = {"pooled_output": torch.randn(1, POOLED, generator=g)}
        if guidance is not None:
            extra["guidance"] = guidance
        return [[torch.randn(1, tokens, CONTEXT, generator=g), extra]]

    return one(), one()
