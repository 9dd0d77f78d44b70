"""Streaming trainer: batch plan, exact resume, held-out evaluation, stopping, errors."""

import pytest
import torch

from sae_core.dataset import ActivationDataset, ShardWriter
from sae_core.errors import SAEConfigError, SAEError
from sae_core.trainer import BatchPlan, StreamConfig, evaluate_rows, train_stream

pytestmark = pytest.mark.usefixtures("one_thread")


def planted_rows(n=3000, d=16, m=24, k=3, seed=0):
    """Rows that are sparse sums of ``m`` fixed unit directions plus noise: a TopK SAE can fit them well."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D = D / D.norm(dim=-1, keepdim=True)
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    coef = torch.rand(n, k, generator=g) * 2 + 0.5
    x = torch.einsum("nk,nkd->nd", coef, D[idx]) + 0.02 * torch.randn(n, d, generator=g) + 0.3
    return x


def make_dataset(folder, rows, shard_rows=500, dtype="float32"):
    w = ShardWriter(folder, shard_rows, dtype)
    w.add(rows)
    w.close()
    return ActivationDataset.open(folder)


CFG = dict(n_latents=32, k=3, batch_size=128, buffer_shards=2, log_every=10, seed=3, dead_after_tokens=2000)


def test_batch_plan_visits_every_training_row_once_per_epoch_minus_buffer_remainders():
    rows = [500, 500, 300, 500, 500]
    plan = BatchPlan(rows, [0, 1, 2, 3], 128, 2, seed=1)
    groups = plan.groups(0)
    assert sorted(s for g, _ in groups for s in g) == [0, 1, 2, 3]
    assert [n for _, n in groups] == [sum(rows[s] for s in g) // 128 for g, _ in groups]
    per_epoch = sum(n for _, n in groups)
    assert plan.locate(0) == (0, 0, 0)
    assert plan.locate(per_epoch) == (1, 0, 0)
    e, gi, b = plan.locate(per_epoch - 1)
    assert (e, gi, b) == (0, len(groups) - 1, groups[-1][1] - 1)
    perm = plan.permutation(0, 0, 1000)
    assert sorted(perm.tolist()) == list(range(1000))
    assert torch.equal(perm, BatchPlan(rows, [0, 1, 2, 3], 128, 2, seed=1).permutation(0, 0, 1000))
    assert plan.groups(1) != groups or plan.permutation(1, 0, 1000).tolist() != perm.tolist()


def test_training_fits_planted_rows_and_reports_held_out(tmp_path):
    ds = make_dataset(tmp_path / "ds", planted_rows())
    res = train_stream(ds, StreamConfig(steps=200, **CFG))
    assert res.finished and res.step == 200
    first, last = res.log[0], res.log[-1]
    assert last["fvu"] < 0.5 * first["fvu"] and last["fvu"] < 0.25
    assert 0 < last["l0"] <= 3
    assert set(last) >= {"fvu", "l0", "dead_fraction", "auxk", "rows_per_s"}
    # held-out numbers are those of an independent evaluation of the returned SAE on the last shard
    ref = evaluate_rows(res.sae, [ds.load(len(ds.shards) - 1)])
    assert res.holdout == pytest.approx(ref)
    x = ds.load(len(ds.shards) - 1).double()
    x_hat = res.sae(x.float()).x_hat.double()
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert res.holdout["fvu"] == pytest.approx(fvu, rel=1e-4)
    prov = res.sae.cfg.provenance
    assert prov["finished"] and prov["world_size"] == 1 and prov["train_config"]["k"] == 3
    # decoder rows stay on the unit sphere
    torch.testing.assert_close(res.sae.W_dec.norm(dim=-1), torch.ones(32))


def test_stopped_then_resumed_run_equals_an_uninterrupted_one(tmp_path):
    ds = make_dataset(tmp_path / "ds", planted_rows())
    cfg = StreamConfig(steps=60, checkpoint_every=25, **CFG)
    whole = train_stream(ds, cfg)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 37  # stops after 37 steps, between two checkpoints

    part = train_stream(ds, cfg, checkpoint_dir=tmp_path / "ck", should_stop=stop)
    assert not part.finished and part.step == 37 and part.holdout is None
    rest = train_stream(ds, cfg, checkpoint_dir=tmp_path / "ck", resume=True)
    assert rest.finished and rest.step == 60
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(rest.sae, name), getattr(whole.sae, name)), name
    strip = [{k: v for k, v in e.items() if k != "rows_per_s"} for e in rest.log]
    assert strip == [{k: v for k, v in e.items() if k != "rows_per_s"} for e in whole.log]


def test_resume_with_other_settings_names_the_key(tmp_path):
    ds = make_dataset(tmp_path / "ds", planted_rows(n=1500))
    train_stream(ds, StreamConfig(steps=5, **CFG), checkpoint_dir=tmp_path / "ck")
    with pytest.raises(SAEConfigError, match="k=3"):
        train_stream(ds, StreamConfig(steps=10, **{**CFG, "k": 4}), checkpoint_dir=tmp_path / "ck", resume=True)
    with pytest.raises(SAEError, match="no checkpoint to resume from"):
        train_stream(ds, StreamConfig(steps=10, **CFG), checkpoint_dir=tmp_path / "none", resume=True)


def test_dataset_too_small_for_the_settings(tmp_path):
    ds = make_dataset(tmp_path / "ds", planted_rows(n=600), shard_rows=600)
    with pytest.raises(SAEConfigError, match="held out leaves none"):
        train_stream(ds, StreamConfig(steps=5, **CFG))
    with pytest.raises(SAEConfigError, match="larger than the 600 training rows"):
        train_stream(ds, StreamConfig(steps=5, **{**CFG, "batch_size": 1024, "holdout_shards": 0}))
