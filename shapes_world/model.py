"""The shapes-world text-to-image model: a small diffusers UNet2DConditionModel + TextEncoder, save/load."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sae_core.mixins import DictRoundTrip

from .text import TextEncoder, TextEncoderConfig, Tokenizer

logger = logging.getLogger(__name__)

FORMAT = "shapes_world.model/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class ModelConfig(DictRoundTrip):
    """Everything needed to rebuild the model and its noise schedule."""

    sample_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_heads: int = 4  # per cross-attention block (diffusers' legacy `attention_head_dim`)
    norm_num_groups: int = 8
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def __post_init__(self):
        if isinstance(self.text, dict):
            self.text = TextEncoderConfig.from_dict(self.text)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if len(self.block_out_channels) != 3:
            raise ValueError(
                f"ModelConfig: block_out_channels={self.block_out_channels}, expected three levels "
                "(32x32 without attention, 16x16 and 8x8 with cross-attention)"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups or c % self.attention_heads:
                raise ValueError(
                    f"ModelConfig: channel count {c} must be divisible by norm_num_groups="
                    f"{self.norm_num_groups} and attention_heads={self.attention_heads}"
                )

    def unet_kwargs(self) -> dict:
        return dict(
            sample_size=self.sample_size,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            cross_attention_dim=self.text.dim,
            attention_head_dim=self.attention_heads,
            use_linear_projection=True,
        )


class ShapesModel(nn.Module):
    """UNet (epsilon prediction on images scaled to [-1, 1]) + text encoder + tokenizer.

    Cross-attention sits at 16x16 (down_blocks.1, up_blocks.1) and 8x8 (down_blocks.2, mid_block,
    up_blocks.0); the 32x32 level has none.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from diffusers import UNet2DConditionModel  # optional extra: only the shapes world needs it

        self.cfg = cfg
        self.unet = UNet2DConditionModel(**cfg.unet_kwargs())
        self.text = TextEncoder(cfg.text)
        self.tokenizer = Tokenizer(cfg.text.max_length)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer.encode(captions).to(self.text.position.device)
        return self.text(ids)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=hidden).sample

    def train_scheduler(self):
        from diffusers import DDPMScheduler

        c = self.cfg
        return DDPMScheduler(
            num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
            beta_start=c.beta_start, beta_end=c.beta_end, prediction_type="epsilon",
        )

    def ddim_scheduler(self):
        from diffusers import DDIMScheduler

        c = self.cfg
        # "trailing" spacing starts sampling at t = 999, the noisiest trained step.
        return DDIMScheduler(
            num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
            beta_start=c.beta_start, beta_end=c.beta_end, prediction_type="epsilon",
            clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing",
        )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_model(
    model: ShapesModel, directory: str | os.PathLike, meta: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32,
) -> Path:
    """Write model.safetensors + config.json into directory (atomically: temp files then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}
    config = {"format": FORMAT, "model": model.cfg.to_dict(), "vocab": list(model.tokenizer.vocab)}
    config.update(meta or {})
    tmp_w, tmp_c = directory / (WEIGHTS_NAME + ".tmp"), directory / (CONFIG_NAME + ".tmp")
    save_file(sd, str(tmp_w), metadata={"format": FORMAT})
    tmp_c.write_text(json.dumps(config, indent=2))
    os.replace(tmp_w, directory / WEIGHTS_NAME)
    os.replace(tmp_c, directory / CONFIG_NAME)
    return directory


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ShapesModel, dict]:
    """Load a directory written by save_model; returns (model in eval mode, float32), config dict)."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; a shapes-world checkpoint has {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format is {config.get('format')!r}, expected {FORMAT!r}")
    model = ShapesModel(ModelConfig.from_dict(config["model"]))
    if tuple(config.get("vocab", ())) != model.tokenizer.vocab:
        raise ValueError(
            f"{cfg_path}: vocabulary {config.get('vocab')} differs from this code's {list(model.tokenizer.vocab)}"
        )
    sd = load_file(str(w_path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{w_path}: keys do not match the config; missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{w_path}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(device).eval(), config
