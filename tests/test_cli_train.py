"""`python -m sae_core collect` / `train`: a real diffusers pipeline folder end to end, and clear errors."""

import io
import json
import string

import pytest
import torch

from sae_core.__main__ import main
from sae_core.dataset import ActivationDataset
from sae_core.formats import load_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    """A StableDiffusionPipeline with tiny random UNet, VAE, CLIP text encoder and tokenizer, saved with save_pretrained."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny_sd")
    tok_dir = root / "tok_src"
    tok_dir.mkdir()
    chars = list(string.ascii_lowercase)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=8)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def test_collect_and_train_on_a_saved_diffusers_pipeline(tiny_sd_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red cat\n\nblue dog\na green bird\n")
    code, out, err = run("collect", "--model", tiny_sd_folder, "--block", "up_blocks.1.attentions.0", "--prompts",
                         prompts, "--out", tmp_path / "ds", "--steps", "3", "--guidance", "5", "--record-steps", "0,2",
                         "--patches-per-map", "20", "--shard-rows", "50", "--height", "16", "--width", "16",
                         "--batch", "2", "--threads", "1")
    assert code == 0, err
    ds = ActivationDataset.open(tmp_path / "ds")
    m = ds.manifest
    # 3 prompts x 2 recorded steps x 20 patches of the cond branch, 32 channels at 16x16
    assert m["rows"] == 3 * 2 * 20 and ds.d_in == 32 and m["recorder"]["grid"] == [16, 16]
    assert m["prompts"] == ["a red cat", "blue dog", "a green bird"]
    assert m["sampler"]["pipeline"] == "StableDiffusionPipeline" and m["sampler"]["steps"] == 3
    assert len(m["model"]["fingerprint"]) == 16 and len(m["recorder"]["timesteps"]) == 2
    assert "wrote" in out and "120 rows" in out

    code, out, err = run("train", tmp_path / "ds", "--out", tmp_path / "sae.safetensors", "--latents", "64",
                         "--k", "4", "--steps", "20", "--batch-size", "16", "--log-every", "5", "--buffer-shards", "2",
                         "--threads", "1")
    assert code == 0, err
    assert "train [" in out and "held-out fvu" in out
    sae = load_sae(tmp_path / "sae.safetensors")
    # the tiny UNet is no SD 1.x / SDXL model: the block is kept in the provenance, not as a hook point
    assert sae.cfg.hook_point is None and sae.cfg.model_family is None and sae.cfg.d_in == 32
    assert sae.cfg.provenance["dataset"]["block"] == "up_blocks.1.attentions.0"
    assert ds.manifest["model"]["family"] is None
    assert sae.cfg.provenance["dataset"]["rows"] == 120 and sae.cfg.provenance["dataset"]["prompts"] == 3
    assert sae.cfg.provenance["finished"]
    # held-out FVU recorded in the file is the one the command printed
    assert f"held-out fvu {sae.cfg.provenance['holdout']['fvu']:.4f}" in out


def test_train_stops_on_time_and_resumes(tmp_path):
    from test_train_stream import make_dataset, planted_rows

    make_dataset(tmp_path / "ds", planted_rows(n=1500))
    args = ("train", tmp_path / "ds", "--out", tmp_path / "s.safetensors", "--latents", "32", "--k", "3",
            "--steps", "30", "--batch-size", "64", "--log-every", "10", "--threads", "1")
    code, out, _ = run(*args, "--max-minutes", "0")
    assert code == 0 and "stopped at step 0 of 30" in out and "--resume" in out
    assert not (tmp_path / "s.safetensors").exists() and (tmp_path / "s.ckpt" / "checkpoint.pt").is_file()
    code, out, _ = run(*args, "--resume")
    assert code == 0 and "wrote" in out
    assert load_sae(tmp_path / "s.safetensors").cfg.provenance["steps_done"] == 30


@pytest.mark.parametrize("argv, expected", [
    (("train", "{tmp}/nothing", "--out", "{tmp}/s.safetensors", "--latents", "8", "--k", "2"), "no manifest.json"),
    (("train", "{tmp}/ds", "--out", "{tmp}/s.pt", "--latents", "8", "--k", "2"), "use a .safetensors name"),
    (("train", "{tmp}/ds", "--out", "{tmp}/s.safetensors", "--latents", "8", "--k", "9"), "k: expected 1..8, found 9"),
    (("train", "{tmp}/ds", "--out", "{tmp}/s.safetensors", "--latents", "8", "--k", "2", "--batch-size", "64", "--resume"),
     "no checkpoint to resume from"),
    (("collect", "--model", "{tmp}/no_model", "--block", "x", "--out", "{tmp}/o", "--prompt", "a"),
     "could not be loaded|no module|diffusers"),
    (("collect", "--model", "{tmp}/ds", "--block", "x", "--out", "{tmp}/o"), "no prompts"),
    (("collect", "--model", "{tmp}/ds", "--block", "x", "--out", "{tmp}/o", "--prompts", "{tmp}/missing.txt"),
     "missing.txt: cannot read the prompt file"),
    (("collect", "--model", "{tmp}/ds", "--block", "x", "--out", "{tmp}/o", "--prompt", "a", "--record-steps", "1,x"),
     "expected 'all' or comma-separated"),
])
def test_bad_input_is_one_clear_line(tmp_path, argv, expected):
    import re

    from test_train_stream import make_dataset, planted_rows

    make_dataset(tmp_path / "ds", planted_rows(n=600))
    code, out, err = run(*[a.format(tmp=tmp_path) for a in argv])
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(expected, err), err


def test_collect_names_a_wrong_block(tiny_sd_folder, tmp_path):
    code, _, err = run("collect", "--model", tiny_sd_folder, "--block", "up_blocks.1.attention.0", "--prompt", "a",
                       "--out", tmp_path / "o", "--steps", "1", "--height", "16", "--width", "16")
    assert code == 1 and "has no such submodule" in err and "up_blocks.1.attentions.0" in err
