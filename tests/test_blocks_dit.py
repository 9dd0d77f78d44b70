"""DiT rows of the hook-point registry (FLUX, SD3 / SD3.5) against hand-written tables and real diffusers
transformers built on the meta device from their published configs (no weights, no memory)."""

import pytest
import torch

from sae_core.blocks import (
    FAMILIES,
    AmbiguousBlockError,
    BlockMismatchError,
    UnknownBlockError,
    blocks,
    canonical_name,
    check_sae_fits,
    grid_size,
    normalize_family,
    resolve_block,
)
from sae_core.blocks_dit import dit_patch_key, family_from_comfy, family_from_diffusers_config
from sae_core.config import MODEL_FAMILIES

# transformer/config.json of the published checkpoints, reduced to what shapes and names depend on
FLUX_DEV = dict(_class_name="FluxTransformer2DModel", attention_head_dim=128, guidance_embeds=True, in_channels=64,
                joint_attention_dim=4096, num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
                pooled_projection_dim=768, axes_dims_rope=[16, 56, 56])
FLUX_SCHNELL = {**FLUX_DEV, "guidance_embeds": False}
SD3_MEDIUM = dict(_class_name="SD3Transformer2DModel", sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD35_LARGE = {**SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
              "qk_norm": "rms_norm"}
SD35_MEDIUM = {**SD3_MEDIUM, "qk_norm": "rms_norm", "pos_embed_max_size": 384,
               "dual_attention_layers": list(range(13))}


def test_dit_tables_written_out():
    flux = blocks("flux")
    assert len(flux) == 19 + 38
    assert flux[0][1:] == ("transformer_blocks.0", "double_blocks.0", "double.0", 3072, 1)
    assert flux[18][1:] == ("transformer_blocks.18", "double_blocks.18", "double.18", 3072, 1)
    assert flux[19][1:] == ("single_transformer_blocks.0", "single_blocks.0", "single.0", 3072, 1)
    assert flux[-1][1:] == ("single_transformer_blocks.37", "single_blocks.37", "single.37", 3072, 1)
    sd3 = blocks("sd3")
    assert [s.comfy for s in sd3] == [f"joint_blocks.{i}" for i in range(24)]
    assert {s.channels for s in sd3} == {1536}
    large = blocks("sd35large")
    assert [s.diffusers for s in large] == [f"transformer_blocks.{i}" for i in range(38)]
    assert {s.channels for s in large} == {2432}
    assert set(MODEL_FAMILIES) == set(FAMILIES)  # an SAE file may record any registry family


@pytest.mark.parametrize("name,family,expected", [
    ("transformer.transformer_blocks.7", "flux", ("transformer_blocks.7", "double_blocks.7")),
    ("transformer.single_transformer_blocks.9", None, ("single_transformer_blocks.9", "single_blocks.9")),
    ("model.diffusion_model.single_blocks.37", None, ("single_transformer_blocks.37", "single_blocks.37")),
    ("diffusion_model.double_blocks.18", None, ("transformer_blocks.18", "double_blocks.18")),
    ("single.3", None, ("single_transformer_blocks.3", "single_blocks.3")),
    ("checkpoints/transformer.single_transformer_blocks.2/", None, ("single_transformer_blocks.2", "single_blocks.2")),
    ("transformer_blocks.12_k32_x4", "sd3", ("transformer_blocks.12", "joint_blocks.12")),
    ("joint.30", "sd35large", ("transformer_blocks.30", "joint_blocks.30")),
])
def test_dit_names_resolve(name, family, expected):
    s = resolve_block(name, family)
    assert (s.diffusers, s.comfy) == expected


def test_dit_names_that_must_not_resolve():
    # in several DiT families: the width decides, or the caller must pass the family
    with pytest.raises(AmbiguousBlockError, match="flux.*sd3"):
        resolve_block("transformer_blocks.3")
    assert resolve_block("transformer_blocks.3", channels=2432).family == "sd35large"
    assert resolve_block("transformer_blocks.3", channels=3072).comfy == "double_blocks.3"
    with pytest.raises(UnknownBlockError, match=r"sub-module \('attn'\).*transformer_blocks.3"):
        resolve_block("transformer.transformer_blocks.3.attn", "flux")
    with pytest.raises(UnknownBlockError, match="sub-module"):  # the UNet's inner transformer block stays refused
        resolve_block("unet.up_blocks.1.attentions.1.transformer_blocks.0")
    with pytest.raises(UnknownBlockError, match="not a hookable block of flux"):
        resolve_block("single_transformer_blocks.38", "flux")
    with pytest.raises(UnknownBlockError, match="not a hookable block of sd3.*sd35large"):
        resolve_block("joint_blocks.30", "sd3")
    with pytest.raises(UnknownBlockError, match="not a hookable block of sd3"):
        resolve_block("single_blocks.0", "sd3")
    with pytest.raises(UnknownBlockError):
        resolve_block("double_blocks.1", "sdxl")


def test_dit_width_check_names_the_blocks_that_fit():
    assert check_sae_fits(3072, "transformer.single_transformer_blocks.9").family == "flux"
    assert check_sae_fits(1536, "transformer_blocks.9").family == "sd3"
    with pytest.raises(BlockMismatchError, match=r"d_in=1280 does not fit block single_transformer_blocks.9 .*3072"):
        check_sae_fits(1280, "single_transformer_blocks.9", source="x.safetensors")
    with pytest.raises(BlockMismatchError, match="sdxl"):  # a UNet SAE named after a DiT block: says where 1280 lives
        check_sae_fits(1280, "double_blocks.1", "flux")


def test_dit_families_and_grids():
    assert normalize_family("FLUX.1-dev") == "flux"
    assert normalize_family("flux-schnell") == "flux"
    assert normalize_family("SD3.5 Large Turbo") == "sd35large"
    assert normalize_family("sd3.5-medium") == "sd3"
    # 2x2 patches with padding on an odd side: ceil(latent / 2), any aspect ratio
    assert tuple(grid_size("double.0", 128, 96)) == (64, 48)
    assert tuple(grid_size("single.0", 75, 33)) == (38, 17)
    assert tuple(grid_size("joint.0", 64, 64, "sd3")) == (32, 32)
    assert canonical_name("double_blocks.4") == "transformer_blocks.4"
    assert canonical_name("single.4") == "single_transformer_blocks.4"
    assert dit_patch_key("double_blocks.4") == ("double_block", 4)
    assert dit_patch_key("joint_blocks.23") == ("double_block", 23)
    assert dit_patch_key("single_blocks.0") == ("single_block", 0)
    with pytest.raises(ValueError):
        dit_patch_key("output_blocks.4.1")


def test_family_inference_from_configs():
    assert family_from_diffusers_config(FLUX_DEV) == "flux"
    assert family_from_diffusers_config(FLUX_SCHNELL) == "flux"
    assert family_from_diffusers_config(SD3_MEDIUM) == "sd3"
    assert family_from_diffusers_config(SD35_MEDIUM) == "sd3"
    assert family_from_diffusers_config(SD35_LARGE) == "sd35large"
    assert family_from_diffusers_config({"_class_name": "UNet2DConditionModel"}) is None
    assert family_from_comfy(["FluxSchnell", "Flux", "BASE"], {"depth": 19}) == "flux"
    assert family_from_comfy(["SD3", "BASE"], {"depth": 38}) == "sd35large"
    assert family_from_comfy(["SD3", "BASE"], {"depth": 24}) == "sd3"
    assert family_from_comfy(["SDXL", "BASE"], {}) is None


diffusers = pytest.importorskip("diffusers")


def _model_kwargs(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _stream_shapes(model, run):
    """{block name: image-stream output shape} from forward hooks on every block (the image stream is the second
    element of the (encoder_hidden_states, hidden_states) pair the blocks return in diffusers)."""
    shapes = {}
    for name, module in model.named_modules():
        if name.count(".") == 1 and name.split(".")[0] in ("transformer_blocks", "single_transformer_blocks"):
            module.register_forward_hook(lambda m, i, o, n=name: shapes.__setitem__(n, tuple(o[1].shape)))
    with torch.no_grad():
        run()
    return shapes


@pytest.mark.parametrize("cfg", [FLUX_DEV, FLUX_SCHNELL], ids=["dev", "schnell"])
def test_registry_matches_diffusers_flux(cfg):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**_model_kwargs(cfg))
    lh, lw = 12, 20  # latent 12x20 -> packed 6x10 tokens (the pipeline's 2x2 packing)
    gh, gw = lh // 2, lw // 2
    meta = dict(device="meta")
    kw = dict(guidance=torch.tensor([3.5], **meta)) if cfg["guidance_embeds"] else {}
    shapes = _stream_shapes(model, lambda: model(
        hidden_states=torch.empty(1, gh * gw, 64, **meta), encoder_hidden_states=torch.empty(1, 7, 4096, **meta),
        pooled_projections=torch.empty(1, 768, **meta), timestep=torch.tensor([0.5], **meta),
        img_ids=torch.zeros(gh * gw, 3, **meta), txt_ids=torch.zeros(7, 3, **meta), **kw))
    family = family_from_diffusers_config(cfg)
    assert list(shapes) == [s.diffusers for s in blocks(family)]
    for s in blocks(family):
        assert shapes[s.diffusers] == (1, gh * gw, s.channels)
        assert tuple(grid_size(s, lh, lw)) == (gh, gw)


@pytest.mark.parametrize("cfg", [SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE], ids=["sd3m", "sd35m", "sd35l"])
def test_registry_matches_diffusers_sd3(cfg):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**_model_kwargs(cfg))
    lh, lw = 12, 20
    meta = dict(device="meta")
    shapes = _stream_shapes(model, lambda: model(
        hidden_states=torch.empty(1, 16, lh, lw, **meta), encoder_hidden_states=torch.empty(1, 7, 4096, **meta),
        pooled_projections=torch.empty(1, 2048, **meta), timestep=torch.tensor([500.0], **meta)))
    family = family_from_diffusers_config(cfg)
    assert list(shapes) == [s.diffusers for s in blocks(family)]
    g = grid_size(blocks(family)[0], lh, lw)
    for s in blocks(family):
        assert shapes[s.diffusers] == (1, g.height * g.width, s.channels)


@pytest.mark.parametrize("family,rows,first", [
    ("flux", 57, "| transformer_blocks.0 | double_blocks.0 | double.0 | 3072 | 32x32 | 64x64 |"),
    ("sd3", 24, "| transformer_blocks.0 | joint_blocks.0 | joint.0 | 1536 | 32x32 | 64x64 |"),
    ("SD3.5-large", 38, "| transformer_blocks.0 | joint_blocks.0 | joint.0 | 2432 | 32x32 | 64x64 |"),
])
def test_cli_blocks_prints_the_dit_tables(family, rows, first):
    import io

    from sae_core.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    assert main(["blocks", "--family", family], out=out, err=err) == 0, err.getvalue()
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("| ") and "diffusers" not in ln]
    assert len(lines) == rows and lines[0] == first
