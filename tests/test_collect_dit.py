"""collect_pipeline on a FLUX transformer: the image tokens of the block (never the text stream) are recorded,
cond only (FLUX's guidance is distilled), and the same commands train an SAE on them."""

import io

import pytest
import torch

from sae_core.collect import CollectSettings, collect_pipeline
from sae_core.dataset import ActivationDataset

diffusers = pytest.importorskip("diffusers")
from test_dit_hooks import TXT, tiny_flux  # noqa: E402


class TinyFluxPipe:
    """What diffusers' FluxPipeline does around its transformer, reduced: random text embeddings per prompt,
    packed 2x2 latents with (0, row, column) ids, flow-matching Euler steps, timestep = sigma."""

    def __init__(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = tiny_flux()
        self.scheduler = FlowMatchEulerDiscreteScheduler()
        self.device = torch.device("cpu")

    def __call__(self, prompt, num_inference_steps, guidance_scale, generator, output_type, height=32, width=48):
        b = len(prompt)
        gh, gw = height // 16, width // 16
        ids = torch.zeros(gh, gw, 3)
        ids[..., 1] = torch.arange(gh)[:, None]
        ids[..., 2] = torch.arange(gw)[None, :]
        latents = torch.randn(b, gh * gw, 16, generator=generator)
        text = torch.randn(b, TXT, 24, generator=generator)
        pooled = torch.randn(b, 12, generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                v = self.transformer(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                                     timestep=(t / 1000).expand(b), img_ids=ids.reshape(-1, 3),
                                     txt_ids=torch.zeros(TXT, 3), return_dict=False)[0]
                latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
        return latents


def test_collect_records_flux_image_tokens_and_train_runs(tmp_path):
    pipe = TinyFluxPipe()
    seen = []
    pipe.transformer.single_transformer_blocks[1].register_forward_hook(lambda m, a, o: seen.append(o[1].clone()))
    settings = CollectSettings(dtype="float32", shard_rows=64)
    m = collect_pipeline(pipe, ["a cat", "a dog", "a house"], "single.1", tmp_path / "ds", settings, steps=2,
                         guidance=3.5, height=32, width=48)
    assert m["block"] == "single_transformer_blocks.1" and m["model"]["family"] == "flux"
    ds = ActivationDataset.open(tmp_path / "ds")
    rows = torch.cat([ds.load(i) for i in range(len(ds.manifest["shards"]))])
    assert rows.shape == (3 * 2 * 2 * 3, 32)  # prompts x steps x (2 x 3 tokens), width 32
    torch.testing.assert_close(rows, torch.cat([s.reshape(-1, 32) for s in seen]))

    from sae_core.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    code = main(["train", str(tmp_path / "ds"), "--out", str(tmp_path / "sae.safetensors"), "--latents", "16",
                 "--k", "2", "--steps", "3", "--batch-size", "8", "--holdout-shards", "0", "--log-every", "1",
                 "--device", "cpu"], out=out, err=err)
    assert code == 0, err.getvalue()
    from sae_core.errors import BlockMismatchError
    from sae_core.formats import load_sae, read_checkpoint

    _, cfg, _, _ = read_checkpoint(tmp_path / "sae.safetensors")
    assert (cfg.hook_point, cfg.model_family, cfg.d_in) == ("single_transformer_blocks.1", "flux", 32)
    with pytest.raises(BlockMismatchError, match="d_in=32 does not fit block single_transformer_blocks.1"):
        load_sae(tmp_path / "sae.safetensors")  # a tiny model's SAE: the real FLUX block has 3072 channels
