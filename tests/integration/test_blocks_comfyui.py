"""The registry against ComfyUI's own UNetModel and its diffusers key map (needs COMFYUI_PATH).

ComfyUI runs in a subprocess (its import reads global CLI args and probes devices), builds the SD1 and
SDXL UNets on the meta device, records every SpatialTransformer's in_channels and output size from a
forward on a non-square latent, and dumps ``comfy.utils.unet_to_diffusers`` for the attention blocks.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from sae_core.blocks import blocks, grid_size, resolve_block

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH or not (pathlib.Path(COMFYUI_PATH) / "comfy").is_dir(),
    reason="set COMFYUI_PATH to a ComfyUI checkout (and run with its venv) for integration tests",
)

LATENT_HW = (50, 66)  # odd, non-square: every level rounds up

PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args
args.cpu = True
args.use_pytorch_cross_attention = True
import torch
import comfy.model_detection, comfy.ops, comfy.utils
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

common = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
              use_spatial_transformer=True, legacy=False, use_temporal_resblock=False,
              use_temporal_attention=False)
# unet_config values as comfy.model_detection.detect_unet_config produces them for the two families
configs = {
    "sd1": dict(common, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1),
    "sdxl": dict(common, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_linear_in_transformer=True,
                 context_dim=2048, num_head_channels=64),
}
h, w = int(sys.argv[2]), int(sys.argv[3])
out = {}
for family, cfg in configs.items():
    unet = UNetModel(**cfg, device="meta", operations=comfy.ops.disable_weight_init)
    seen = {}
    for name, m in unet.named_modules():
        if isinstance(m, SpatialTransformer):
            m.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, [m.in_channels, *o.shape[2:]]))
    kw = {"y": torch.empty(1, 2816, device="meta")} if cfg["adm_in_channels"] else {}
    with torch.no_grad():
        unet(torch.empty(1, 4, h, w, device="meta"), torch.tensor([500.0], device="meta"),
             context=torch.empty(1, 77, cfg["context_dim"], device="meta"), **kw)
    key_map = comfy.utils.unet_to_diffusers(cfg)
    names = {k[: -len(".proj_out.weight")]: v[: -len(".proj_out.weight")]
             for k, v in key_map.items() if k.endswith(".proj_out.weight") and ".transformer_blocks." not in k}
    # what ComfyUI itself detects from these weights (the config a loaded model carries)
    detected = comfy.model_detection.detect_unet_config(unet.state_dict(), "")
    model_config = comfy.model_detection.model_config_from_unet_config(detected)
    out[family] = {"modules": seen, "diffusers_to_comfy": names, "detected": detected,
                   "model_config": type(model_config).__name__}
print(json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def comfy_unets():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, COMFYUI_PATH, *map(str, LATENT_HW)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_registry_matches_comfyui_unet(comfy_unets, family):
    got = comfy_unets[family]
    specs = blocks(family)
    # the same set of SpatialTransformers, under the same names, in both directions
    assert sorted(got["modules"]) == sorted(s.comfy for s in specs)
    assert got["diffusers_to_comfy"] == {s.diffusers: s.comfy for s in specs}
    for path, (channels, h, w) in got["modules"].items():
        spec = resolve_block("diffusion_model." + path, family)
        assert spec.channels == channels, path
        assert grid_size(spec, *LATENT_HW) == (h, w), path


@pytest.mark.parametrize("family, comfy_class", [("sd1", "SD15"), ("sdxl", "SDXL")])
def test_comfyui_detects_the_tiny_unets_as_their_family(comfy_unets, family, comfy_class):
    got = comfy_unets[family]
    assert got["model_config"] == comfy_class  # ComfyUI agrees which model these weights are
