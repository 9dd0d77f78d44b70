"""Collect Activations and Train SAE through ComfyUI's real sampler on the tiny SD1 UNet; interrupt and resume."""

import comfy.model_management
import comfy.patcher_extension
import folder_paths
import pytest
import torch
from test_nodes_comfyui import FakeClip, models_dir, with_capture  # noqa: F401 - models_dir is a fixture

SD1_KEY, SD1_NAME, WIDTH = "output_blocks.4.1", "up_blocks.1.attentions.1", 128


@pytest.fixture
def output_dir(tmp_path):
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    yield tmp_path / "output"
    folder_paths.set_output_directory(old)


COLLECT = dict(block=SD1_NAME, prompts="a cat\na dog\na bird", negative_prompt="", dataset_name="tiny",
               width=64, height=64, steps=2, cfg=3.0, sampler_name="euler", scheduler="normal", seed=5,
               input_space="output", branches="cond", patches_per_map=0, shard_rows=1024, overwrite=False)


def test_collect_records_the_cond_block_outputs_the_sampler_produced(pack, sd1, output_dir):
    tn = pack.nodes.train_nodes
    captured, cap = with_capture(pack, sd1.model, SD1_KEY)
    out = tn.CollectActivations.execute(captured, FakeClip(), **COLLECT)
    folder = out.args[0]
    assert not sd1.model.object_patches
    ds = pack.sae_core.dataset.ActivationDataset.open(folder)
    got = torch.cat([ds.load(i) for i in range(len(ds.shards))]).float()
    # reference: the cond rows of every captured block call, channels last, in call order, stored as float16
    ref = []
    for _, block_out, step in cap.calls:
        rows = block_out[[c for c, f in enumerate(step.chunks) if f == 0]]
        ref.append(rows.permute(0, 2, 3, 1).reshape(-1, block_out.shape[1]))
    ref = torch.cat(ref).half().float()
    assert len(cap.calls) == 3 * 2 and got.shape == ref.shape and ds.d_in == WIDTH
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    m = ds.manifest
    assert m["block"] == SD1_NAME and m["model"]["family"] == "sd1" and m["prompts"] == ["a cat", "a dog", "a bird"]
    assert m["complete"] and len(m["recorder"]["timesteps"]) == 2


def test_train_node_writes_an_sae_and_resumes_after_interrupt(pack, sd1, output_dir, models_dir):  # noqa: F811
    tn = pack.nodes.train_nodes
    tn.CollectActivations.execute(sd1.model, FakeClip(), **{**COLLECT, "steps": 3, "width": 128, "height": 128,
                                                            "shard_rows": 128})
    kw = dict(dataset="tiny", sae_name="tiny_sae", latents=64, k=4, steps=12, batch_size=64, lr=0.0, seed=1,
              holdout_shards=1, max_minutes=0.0, resume=False, checkpoint_every=0)
    # interrupted before the first step: the checkpoint is written and ComfyUI's interruption raised
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            tn.TrainSAE.execute(**kw)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    ckpt = models_dir / "sae" / "tiny_sae.ckpt" / "checkpoint.pt"
    assert ckpt.is_file() and not (models_dir / "sae" / "tiny_sae.safetensors").exists()
    # a time budget that is already spent: stops, saves the SAE so far, the queue moves on
    out = tn.TrainSAE.execute(**{**kw, "resume": True, "max_minutes": 1e-9})
    assert not out.args[0].cfg.provenance["finished"]
    # resume to the end: the same SAE as one uninterrupted run
    out = tn.TrainSAE.execute(**{**kw, "resume": True, "dataset": "", "dataset_in": str(output_dir / "sae_datasets" / "tiny")})
    sae = out.args[0]
    assert sae.cfg.provenance["finished"] and sae.cfg.hook_point == SD1_NAME and sae.cfg.model_family == "sd1"
    whole = tn.TrainSAE.execute(**{**kw, "sae_name": "whole"}).args[0]
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(whole, name)), name
    # the file in models/sae is the returned SAE (Load SAE would also check its width against the real SD1 block,
    # which this tiny UNet does not have)
    assert "tiny_sae.safetensors" in pack.nodes.folders.list_sae_entries(folder_paths)
    cfg, tensors = pack.sae_core.formats.native.read(models_dir / "sae" / "tiny_sae.safetensors")
    assert torch.equal(tensors["W_dec"], sae.W_dec) and cfg.provenance["finished"]
