"""Activation collection: shard writer, recording intervention, dataset reader, both drivers."""

import json

import pytest
import torch

from sae_core.collect import ActivationRecorder, CollectSettings
from sae_core.dataset import MANIFEST, ActivationDataset, ShardWriter
from sae_core.errors import SAEConfigError, SAEFormatError
from sae_core.intervention import StepInfo


def test_writer_splits_into_bounded_shards_with_exact_moments(tmp_path):
    rows = torch.randn(1000, 7) * 3 + 1
    w = ShardWriter(tmp_path / "ds", shard_rows=300, dtype="float32")
    for part in rows.split(137):  # calls that straddle shard boundaries
        w.add(part)
    m = w.close(note="x")
    assert [s["rows"] for s in m["shards"]] == [300, 300, 300, 100]
    assert m["complete"] and m["rows"] == 1000 and m["note"] == "x"
    assert not list((tmp_path / "ds").glob("*.tmp"))
    ds = ActivationDataset.open(tmp_path / "ds")
    torch.testing.assert_close(torch.cat([ds.load(i) for i in range(4)]), rows, rtol=0, atol=0)
    mean, total_var, n = ds.moments(range(4))
    x = rows.double()
    assert n == 1000
    torch.testing.assert_close(mean, x.mean(0))
    assert total_var == pytest.approx(float((x - x.mean(0)).pow(2).sum(-1).mean()), rel=1e-9)
    # the buffer never grows past one shard
    assert w.buf.shape == (300, 7)


def test_writer_refuses_an_existing_dataset(tmp_path):
    w = ShardWriter(tmp_path, 10)
    w.add(torch.ones(3, 2))
    w.close()
    with pytest.raises(SAEFormatError, match="already holds a dataset"):
        ShardWriter(tmp_path, 10)


def _maps(b=4, c=3, h=2, w=5):
    return torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)


def _rows_of(maps):  # independent of einops: channels last, row-major positions
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def test_recorder_keeps_the_cond_rows_of_a_cfg_batch_and_changes_nothing(tmp_path):
    w = ShardWriter(tmp_path, 1000, dtype="float32")
    rec = ActivationRecorder(w, CollectSettings(branches="cond", dtype="float32"))
    assert not rec.needs_block_in  # output recording: hosts need not copy the block input
    assert ActivationRecorder(w, CollectSettings(input_space="residual")).needs_block_in
    out = _maps()
    # diffusers layout [uncond; cond]: rows 2,3 are the cond branch
    assert rec(None, out, StepInfo(500.0, chunks=(1, 0), step_index=0)) is out
    w.close()
    got = ActivationDataset.open(tmp_path).load(0)
    torch.testing.assert_close(got, _rows_of(out[2:]), rtol=0, atol=0)


def test_recorder_residual_steps_and_patch_subsampling(tmp_path):
    w = ShardWriter(tmp_path, 1000, dtype="float32")
    s = CollectSettings(input_space="residual", branches="both", step_indices=(1,), patches_per_map=4, dtype="float32")
    rec = ActivationRecorder(w, s)
    x_in, out = _maps() * 0.5, _maps()
    rec(x_in, out, StepInfo(900.0, chunks=(0, 1), step_index=0))  # not a recorded step
    rec(x_in, out, StepInfo(800.0, chunks=(0, 1), step_index=1))
    w.close()
    got = ActivationDataset.open(tmp_path).load(0)
    full = _rows_of(out - x_in).reshape(4, 10, 3)
    assert got.shape == (16, 3)
    for b in range(4):  # 4 distinct positions of map b, in the order drawn
        picked = got[4 * b:4 * b + 4]
        matches = [int(((full[b] - r).abs().sum(-1) == 0).nonzero()) for r in picked]
        assert len(set(matches)) == 4
    with pytest.raises(ValueError, match="step index"):
        rec(x_in, out, StepInfo(800.0, chunks=(0, 1)))
    with pytest.raises(ValueError, match="block input"):
        rec(None, out, StepInfo(800.0, chunks=(0, 1), step_index=1))


def test_recorder_takes_token_sequences(tmp_path):
    w = ShardWriter(tmp_path, 1000, dtype="float32")
    rec = ActivationRecorder(w, CollectSettings(branches="cond", dtype="float32"))
    tokens = torch.randn(2, 6, 5)
    rec(None, tokens, StepInfo(1.0, chunks=(0,)))
    w.close()
    torch.testing.assert_close(ActivationDataset.open(tmp_path).load(0), tokens.reshape(-1, 5), rtol=0, atol=0)


def test_settings_and_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(SAEConfigError, match="input_space"):
        CollectSettings(input_space="resid")
    with pytest.raises(SAEFormatError, match="manifest.json"):
        ActivationDataset.open(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(SAEFormatError, match="expected 'sae-concept-eraser/activations'"):
        ActivationDataset.open(tmp_path)


# -- drivers ----------------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def shapes_model():
    from pathlib import Path

    import shapes_world
    from shapes_world.model import load_model

    return load_model(Path(shapes_world.__file__).parent / "weights")[0]


@pytest.mark.usefixtures("one_thread")
def test_shapes_driver_records_what_the_shapes_tap_records(shapes_model, tmp_path):
    from shapes_world.collect import collect_shapes
    from shapes_world.learn import BLOCK, ActivationTap
    from shapes_world.render import render
    from shapes_world.scenes import generate_scenes

    caps = generate_scenes(3, seed=5).captions
    m = collect_shapes(shapes_model, caps, "output_blocks.4.1", tmp_path / "ds", CollectSettings(shard_rows=700),
                       steps=3, batch=2)
    assert m["block"] == BLOCK and m["rows"] == 3 * 3 * 256 and len(m["shards"]) == 4
    assert m["recorder"]["grid"] == [16, 16] and len(m["recorder"]["timesteps"]) == 3
    ds = ActivationDataset.open(tmp_path / "ds")
    got = torch.cat([ds.load(i) for i in range(len(ds.shards))])
    tap = ActivationTap()  # same batches and seeds as the driver
    render(shapes_model, caps[:2], seed=0, steps=3, interventions={BLOCK: tap})
    render(shapes_model, caps[2:], seed=2, steps=3, interventions={BLOCK: tap})
    torch.testing.assert_close(got, tap.tensor(), rtol=0, atol=0)
