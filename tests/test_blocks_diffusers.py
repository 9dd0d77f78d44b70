"""The registry against real diffusers UNets built on the meta device (no weights, no memory).

Channels and feature-map sizes are read from forward hooks on every Transformer2DModel, so a wrong
level, channel width or rounding rule in the registry fails here. Skips when diffusers is absent.
"""

import pytest
import torch

from sae_core.blocks import blocks, grid_size, resolve_block

diffusers = pytest.importorskip("diffusers")

# Published architecture hyper-parameters of the two families (unet/config.json of
# stable-diffusion-v1-5 and sdxl-base-1.0 / sdxl-turbo), reduced to what shapes depend on.
SD1_CONFIG = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SDXL_CONFIG = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def _block_shapes(config, latent_hw):
    from diffusers import UNet2DConditionModel
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    shapes = {}
    for name, module in unet.named_modules():
        if isinstance(module, Transformer2DModel):
            module.register_forward_hook(lambda m, i, o, n=name: shapes.__setitem__(n, tuple(o[0].shape)))
    kw = {}
    if config.get("addition_embed_type") == "text_time":
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.empty(1, 1280, device="meta"),
            "time_ids": torch.empty(1, 6, device="meta"),
        }
    with torch.no_grad():
        unet(
            torch.empty(1, 4, *latent_hw, device="meta"),
            torch.tensor([500.0], device="meta"),
            encoder_hidden_states=torch.empty(1, 77, config["cross_attention_dim"], device="meta"),
            **kw,
        )
    return shapes


@pytest.mark.parametrize("family, config", [("sd1", SD1_CONFIG), ("sdxl", SDXL_CONFIG)])
@pytest.mark.parametrize("latent_hw", [(48, 64), (50, 66)])  # 384x512 image; odd sizes round up
def test_registry_matches_diffusers_unet(family, config, latent_hw):
    shapes = _block_shapes(config, latent_hw)
    assert sorted(shapes) == sorted(s.diffusers for s in blocks(family))
    for name, (_, channels, h, w) in shapes.items():
        spec = resolve_block(name, family)
        assert spec.channels == channels, name
        assert grid_size(spec, *latent_hw) == (h, w), name



@pytest.mark.parametrize("config,family", [(SD1_CONFIG, "sd1"), (SDXL_CONFIG, "sdxl")])
def test_family_from_a_diffusers_unet_config(config, family):
    """The family is read from the config diffusers itself builds (defaults filled in, tuples as lists after a
    config.json round trip); a UNet of another layout has none."""
    from diffusers import UNet2DConditionModel

    from sae_core.blocks import family_from_diffusers

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    cfg = dict(unet.config)
    assert family_from_diffusers(cfg) == family
    assert family_from_diffusers({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}) == family
    assert family_from_diffusers({**cfg, "cross_attention_dim": 1024}) is None  # SD 2.x text width: no table
    assert family_from_diffusers({**cfg, "block_out_channels": [32, 64]}) is None
