"""Test-only ComfyUI nodes (V1 API) that the server test installs beside the pack: a tiny SD1 UNet,
random conditioning, and a latent-to-image stand-in for a VAE. Never shipped with the pack."""

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from tiny_unets import build_sd1, conds  # noqa: E402

_CACHE = {}


class TinySD1:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self):
        if "m" not in _CACHE:
            with torch.inference_mode(False):
                _CACHE["m"] = build_sd1().model
        return (_CACHE["m"],)


class TinyConds:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 3})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, seed):
        return conds("sd1", seed=seed)


class LatentToImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, samples):
        x = samples["samples"][:, :3].float()
        x = torch.nn.functional.interpolate(x, scale_factor=8, mode="nearest")
        return (torch.sigmoid(x).movedim(1, -1),)


NODE_CLASS_MAPPINGS = {"SAETestTinySD1": TinySD1, "SAETestConds": TinyConds, "SAETestLatentToImage": LatentToImage}
