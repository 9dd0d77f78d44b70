"""Concept dictionaries: SAeUron score/selection against an independent NumPy version, lookup, files."""

import json

import numpy as np
import pytest
import torch
from planted import planted_sae
from safetensors.torch import save_file

from sae_core.concept_stats import ConceptStats, ConceptStatsAccumulator
from sae_core.concepts import ConceptDictionary, ConceptFileError, ConceptMismatchError, load_concepts
from sae_core.formats.saeuron import ddim_leading_timesteps, import_saeuron_stats
from sae_core.selection import (
    SelectionRule,
    build_concept_dictionary,
    saeuron_scores,
    select_latents,
    specific_latents,
)

# -- independent reference (NumPy, float64, written from docs/FORMULAS.md section 5) -------------------


def ref_build(means, counts, c, percentile=None, top_n=None):
    """-> per t: (selected ids sorted by score desc, scores, tau)."""
    means = np.asarray(means, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    C, T, M = means.shape
    out = []
    for t in range(T):
        others = [o for o in range(C) if o != c]
        w = counts[others, t]
        mu_notc = (means[others, t] * w[:, None]).sum(0) / w.sum()
        mu_c = means[c, t]
        score = mu_c / (mu_c.sum() + 1e-8) - mu_notc / (mu_notc.sum() + 1e-8)
        if percentile is not None:
            q = np.quantile(score, percentile / 100.0)  # linear interpolation, like torch.quantile
            ids = np.nonzero(score > q)[0]
        else:
            ids = np.argsort(-score, kind="stable")[:top_n]
        ids = ids[np.argsort(-score[ids], kind="stable")]
        tau = means[:, t].mean(0)
        out.append((ids, score, tau))
    return out


def random_stats(C=3, T=4, M=50, seed=0, counts=None):
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(C, T, M, generator=g, dtype=torch.float64) ** 4  # sparse-ish, positive
    counts = torch.tensor(counts, dtype=torch.float64)[:, None].expand(C, T) if counts else torch.ones(C, T, dtype=torch.float64)
    return ConceptStats(tuple(f"c{i}" for i in range(C)), torch.linspace(999, 0, T, dtype=torch.float64), means, counts.clone())


@pytest.mark.parametrize("counts", [None, [5, 2, 9]])
@pytest.mark.parametrize("percentile", [90.0, 97.5])
def test_percentile_dictionary_matches_reference(percentile, counts):
    stats = random_stats(counts=counts)
    d = build_concept_dictionary(stats, SelectionRule("percentile", percentile=percentile))
    for c in range(3):
        ref = ref_build(stats.means, stats.counts, c, percentile=percentile)
        for t, (ids, score, tau) in enumerate(ref):
            lat = d.latents[c, t]
            got = lat[lat >= 0]
            assert got.tolist() == ids.tolist()
            n = len(ids)
            torch.testing.assert_close(d.scores[c, t, :n].double(), torch.from_numpy(score[ids]), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(d.thresholds[c, t, :n].double(), torch.from_numpy(tau[ids]), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(d.means[c, t, :n], stats.means[c, t, ids].float())


def test_top_n_and_fixed_threshold_match_reference():
    stats = random_stats(C=2, T=3, M=40, seed=3)
    d = build_concept_dictionary(stats, SelectionRule("top_n", top_n=4, fixed_threshold=0.25), keep=["c1"])
    assert d.names == ("c1",)
    for t, (ids, _, _) in enumerate(ref_build(stats.means, stats.counts, 1, top_n=4)):
        assert d.latents[0, t].tolist() == ids.tolist()
        assert torch.all(d.thresholds[0, t] == 0.25)


def test_scores_match_reference_formula():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(5, 30, generator=g), torch.rand(5, 30, generator=g)
    ref = a.double().numpy() / (a.double().numpy().sum(-1, keepdims=True) + 1e-8) - b.double().numpy() / (
        b.double().numpy().sum(-1, keepdims=True) + 1e-8)
    torch.testing.assert_close(saeuron_scores(a, b), torch.from_numpy(ref))


@pytest.mark.parametrize("percentile,count", [(99.999, 1), (99.995, 2), (99.99, 3)])
def test_saeuron_percentiles_at_20480_latents(percentile, count):
    scores = torch.randn(2, 20480, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    sel = select_latents(scores, SelectionRule("percentile", percentile=percentile))
    for t in range(2):
        assert sel[t].tolist() == torch.topk(scores[t], count).indices.tolist()


def test_percentile_is_strict_on_ties():
    # all scores equal: the quantile equals every score and strict '>' selects nothing (as the original)
    sel = select_latents(torch.zeros(1, 100, dtype=torch.float64), SelectionRule("percentile", percentile=99.0))
    assert sel[0].numel() == 0


def test_accumulator_means_and_build():
    M = 12
    acc = ConceptStatsAccumulator(M)
    g = torch.Generator().manual_seed(2)
    data = {}
    for name, n_prompts in (("cat", 2), ("dog", 3), ("other", 1)):
        for t in (999.0, 500.0, 1.0):
            for _ in range(n_prompts):
                codes = torch.rand(4, 3, M, generator=g)  # one prompt: 4 x 3 patches
                acc.add(name, t, codes)
                data.setdefault((name, t), []).append(codes.reshape(-1, M))
    stats = acc.stats()
    assert stats.names == ("cat", "dog", "other")
    assert stats.timesteps.tolist() == [999.0, 500.0, 1.0]
    for c, name in enumerate(stats.names):
        for ti, t in enumerate(stats.timesteps.tolist()):
            rows = torch.cat(data[(name, t)]).double()
            torch.testing.assert_close(stats.means[c, ti], rows.mean(0))
            assert stats.counts[c, ti] == rows.shape[0]
    d = build_concept_dictionary(stats, SelectionRule("percentile", percentile=80.0), keep=["cat"])
    ref = ref_build(stats.means, stats.counts, 0, percentile=80.0)
    for t, (ids, _, _) in enumerate(ref):
        assert d.latents[0, t][d.latents[0, t] >= 0].tolist() == ids.tolist()


def test_accumulator_bad_inputs():
    acc = ConceptStatsAccumulator(8)
    with pytest.raises(ValueError, match="codes have 5 latents, expected 8"):
        acc.add("a", 1.0, torch.zeros(2, 5))
    acc.add("a", 999.0, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="need at least 2"):
        acc.stats()
    acc.add("b", 998.0, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="other timesteps"):
        acc.stats()
    with pytest.raises(ValueError, match="n_latents is 0"):
        ConceptStatsAccumulator(0)


def test_build_bad_inputs():
    stats = random_stats(C=2)
    with pytest.raises(KeyError, match="'zebra', not among the recorded concepts"):
        build_concept_dictionary(stats, keep=["zebra"])
    one = ConceptStats(("a",), stats.timesteps, stats.means[:1], stats.counts[:1])
    with pytest.raises(ValueError, match="need at least 2"):
        build_concept_dictionary(one)


@pytest.mark.parametrize("kwargs,msg", [
    ({"method": "median"}, "method is 'median'"),
    ({"percentile": 100.0}, "percentile is 100.0"),
    ({"percentile": 0.0}, "percentile is 0.0"),
    ({"method": "top_n", "top_n": 0}, "top_n is 0"),
    ({"fixed_threshold": float("nan")}, "fixed_threshold is nan"),
    ({"method": "specific", "max_ratio": 1.5}, "max_ratio is 1.5"),
    ({"method": "specific", "min_rate": -0.1}, "min_rate is -0.1"),
    ({"method": "specific", "top_n": 0}, "top_n is 0"),
])
def test_selection_rule_rejects(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SelectionRule(**kwargs)


def test_selection_rule_round_trip_and_unknown_key():
    r = SelectionRule("top_n", top_n=3, fixed_threshold=0.5)
    assert SelectionRule.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="unknown keys \\['gamma'\\]"):
        SelectionRule.from_dict({"gamma": 1})


# -- lookup ----------------------------------------------------------------------------------------


def hundred_step_dictionary():
    T, M = 100, 30
    ts = torch.linspace(999, 0, T)
    lat = torch.full((2, T, 2), -1, dtype=torch.long)
    for t in range(T):
        lat[0, t, 0] = t % M
        lat[1, t, :2] = torch.tensor([(t + 1) % M, t % M])  # shares one latent with concept 0
    vals = torch.arange(2 * T * 2, dtype=torch.float32).view(2, T, 2)
    return ConceptDictionary(("a", "b"), M, ts, lat, vals, vals + 1000, vals + 2000)


@pytest.mark.parametrize("t", [999.0, 750.0, 250.3, 0.0, 1200.0, -5.0])
def test_nearest_timestep_lookup(t):
    d = hundred_step_dictionary()
    expect = int(np.argmin(np.abs(np.linspace(999, 0, 100) - t)))
    st = d.at(t, ["a"])
    assert st.timestep == pytest.approx(float(d.timesteps[expect]))
    assert st.latents.tolist() == [expect % 30]
    assert st.thresholds.tolist() == [float(d.thresholds[0, expect, 0])]


def test_union_of_concepts_sharing_a_latent():
    d = hundred_step_dictionary()
    st = d.at(999.0)  # a: [0], b: [1, 0]: latent 0 is selected by both
    assert st.latents.tolist() == [0, 1]
    assert st.concept.tolist() == [0, 1]
    # latent 0 fires where either concept's test fires (the smaller tau) and is ablated as strongly as either asks
    # (the larger mu); latent 1 is b's alone
    tau0 = min(float(d.thresholds[0, 0, 0]), float(d.thresholds[1, 0, 1]))
    mu0 = max(float(d.means[0, 0, 0]), float(d.means[1, 0, 1]))
    assert st.thresholds.tolist() == [tau0, float(d.thresholds[1, 0, 0])]
    assert st.means.tolist() == [mu0, float(d.means[1, 0, 0])]
    rev = d.at(999.0, ["b", "a"])  # the order of the concepts changes nothing but the order of the latents
    by_id = dict(zip(rev.latents.tolist(), zip(rev.thresholds.tolist(), rev.means.tolist(), strict=True), strict=True))
    assert by_id == {0: (tau0, mu0), 1: (float(d.thresholds[1, 0, 0]), float(d.means[1, 0, 0]))}
    with pytest.raises(KeyError, match="'c' is not in this dictionary"):
        d.at(0.0, ["c"])


def test_from_latents_and_errors():
    d = ConceptDictionary.from_latents([3, 1], 10, threshold=0.5, name="typed")
    st = d.at(123.0)
    assert st.latents.tolist() == [3, 1] and st.thresholds.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match=r"\[10\] out of range 0..9"):
        ConceptDictionary.from_latents([10], 10)
    with pytest.raises(ValueError, match="no latent ids"):
        ConceptDictionary.from_latents([], 10)
    with pytest.raises(ValueError, match="duplicates"):
        ConceptDictionary.from_latents([2, 2], 10)


def test_dictionary_rejects_bad_shapes():
    ts = torch.zeros(2)
    lat = torch.zeros(1, 2, 3, dtype=torch.long)
    with pytest.raises(ConceptFileError, match=r"thresholds has shape \(1, 2, 2\), expected \(1, 2, 3\)"):
        ConceptDictionary(("a",), 5, ts, lat, torch.zeros(1, 2, 3), torch.zeros(1, 2, 2), torch.zeros(1, 2, 3))
    with pytest.raises(ConceptFileError, match=r"latents has shape \(1, 2, 3\), expected \(2, 2, K\)"):
        ConceptDictionary(("a", "b"), 5, ts, lat, *(torch.zeros(1, 2, 3) for _ in range(3)))
    with pytest.raises(ConceptFileError, match="latent ids range 7..7, expected -1 \\(padding\\) or 0..4"):
        ConceptDictionary(("a",), 5, ts, lat + 7, *(torch.zeros(1, 2, 3) for _ in range(3)))


# -- files -------------------------------------------------------------------------------------------


def built_for(sae):
    stats = random_stats(C=3, T=5, M=sae.cfg.n_latents, seed=4)
    return build_concept_dictionary(
        stats, SelectionRule("percentile", percentile=90.0), keep=["c0", "c2"], sae_fingerprint=sae.fingerprint(),
        hook_point=sae.cfg.hook_point, model_family="sd1", prompts={"c0": ["a cat"], "c2": ["a dog", "dogs"]},
    )


def test_save_load_round_trip(tmp_path):
    sae, _ = planted_sae()
    d = built_for(sae)
    p = tmp_path / "cats.safetensors"
    d.save(p)
    e = load_concepts(p, sae=sae)
    assert e.names == d.names and e.n_latents == d.n_latents
    for k in ("timesteps", "latents", "scores", "thresholds", "means"):
        torch.testing.assert_close(getattr(e, k), getattr(d, k), rtol=0, atol=0)
    assert e.meta.sae_fingerprint == sae.fingerprint()
    assert e.meta.prompts == {"c0": ["a cat"], "c2": ["a dog", "dogs"]}
    assert e.meta.selection == {"method": "percentile", "percentile": 90.0, "top_n": 1, "fixed_threshold": None,
                               "max_ratio": 0.2, "min_rate": 0.002}
    assert e.meta.hook_point == "up_blocks.1.attentions.1" and e.meta.model_family == "sd1"
    assert e.meta.extra["source"] == str(p)  # where it came from, for error messages ...
    q = tmp_path / "again.safetensors"
    e.save(q)
    assert load_concepts(q).meta.extra["source"] == str(q)  # ... never written back into a re-saved file


def test_load_against_other_sae_names_both_fingerprints(tmp_path):
    sae, _ = planted_sae()
    other, _ = planted_sae(seed=5)
    p = tmp_path / "c.safetensors"
    built_for(sae).save(p)
    with pytest.raises(ConceptMismatchError) as ei:
        load_concepts(p, sae=other)
    msg = str(ei.value)
    assert sae.fingerprint() in msg and other.fingerprint() in msg and str(p) in msg
    wider, _ = planted_sae(M=32)
    with pytest.raises(ConceptMismatchError, match="24 latents, but planted-sae has 32"):
        load_concepts(p, sae=wider)


def test_load_rejects_non_concept_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ConceptFileError, match="not a readable safetensors file"):
        load_concepts(junk)
    sae_like = tmp_path / "sae.safetensors"
    save_file({"W_dec": torch.zeros(2, 2)}, str(sae_like))
    with pytest.raises(ConceptFileError, match="no 'sae_concepts' entry"):
        load_concepts(sae_like)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_concepts(tmp_path / "missing.safetensors")


def _rewrite(tmp_path, d, header_edit=None, drop=None):
    p = tmp_path / "c.safetensors"
    d.save(p)
    from safetensors import safe_open
    with safe_open(str(p), "pt") as fh:
        header = json.loads(fh.metadata()["sae_concepts"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != drop}
    if header_edit:
        header_edit(header)
    q = tmp_path / "edited.safetensors"
    save_file(tensors, str(q), metadata={"sae_concepts": json.dumps(header)})
    return q


def test_load_rejects_wrong_version_missing_tensor_bad_json(tmp_path):
    sae, _ = planted_sae()
    d = built_for(sae)
    q = _rewrite(tmp_path, d, header_edit=lambda h: h.update(format_version=99))
    with pytest.raises(ConceptFileError, match="version 99, expected 'sae-concepts' version 2 \\(or 1\\)"):
        load_concepts(q)
    q = _rewrite(tmp_path, d, drop="thresholds")
    with pytest.raises(ConceptFileError, match=r"missing tensors \['thresholds'\]"):
        load_concepts(q)
    q = _rewrite(tmp_path, d, header_edit=lambda h: h.pop("names"))
    with pytest.raises(ConceptFileError, match="metadata lacks 'names'"):
        load_concepts(q)
    bad = tmp_path / "badjson.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad), metadata={"sae_concepts": "{nope"})
    with pytest.raises(ConceptFileError, match="not valid JSON"):
        load_concepts(bad)


def test_to_json_is_readable_and_exact(tmp_path):
    sae, _ = planted_sae()
    d = built_for(sae)
    out = tmp_path / "c.json"
    d.to_json(out)
    doc = json.loads(out.read_text())
    assert doc["names"] == ["c0", "c2"] and doc["sae_fingerprint"] == sae.fingerprint()
    rows = doc["concepts"]["c2"]
    assert len(rows) == 5
    for ti, row in enumerate(rows):
        assert row["timestep"] == pytest.approx(float(d.timesteps[ti]))
        lat = d.latents[1, ti]
        assert [e["id"] for e in row["latents"]] == lat[lat >= 0].tolist()
        for j, e in enumerate(row["latents"]):
            assert e["tau"] == pytest.approx(float(d.thresholds[1, ti, j]))
            assert e["mu"] == pytest.approx(float(d.means[1, ti, j]))


# -- SAeUron's published statistics --------------------------------------------------------------

_UNPICKLED = []


class _Tripwire:
    def __reduce__(self):
        return (_UNPICKLED.append, ("unpickled",))


def test_saeuron_import_refuses_without_trust(tmp_path):
    import pickle

    p = tmp_path / "style_latents_dict_up.1.2.pkl"
    p.write_bytes(pickle.dumps({"Cat": torch.zeros(2, 3, 8), "x": _Tripwire()}))
    _UNPICKLED.clear()
    with pytest.raises(PermissionError, match="refusing to unpickle.*trust=True"):
        import_saeuron_stats(p)
    assert _UNPICKLED == []  # nothing was unpickled


def test_saeuron_import_with_trust_matches_reference(tmp_path):
    import pickle

    g = torch.Generator().manual_seed(0)
    raw = {"Cats": torch.rand(3, 4, 16, generator=g).half(), "Dogs": torch.rand(5, 4, 16, generator=g).half()}
    p = tmp_path / "class_latents_dict.pkl"
    p.write_bytes(pickle.dumps(raw))
    stats = import_saeuron_stats(p, trust=True, timesteps=torch.tensor([750.0, 500.0, 250.0, 1.0]))
    assert stats.names == ("Cats", "Dogs")
    torch.testing.assert_close(stats.means[1], raw["Dogs"].double().mean(0))
    assert stats.counts[:, 0].tolist() == [3.0, 5.0]
    d = build_concept_dictionary(stats, SelectionRule("top_n", top_n=2), keep=["Cats"])
    ref = ref_build(stats.means, stats.counts, 0, top_n=2)
    assert d.latents[0].tolist() == [r[0].tolist() for r in ref]
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"Cats": torch.zeros(4, 16)}))
    with pytest.raises(ConceptFileError, match=r"'Cats' has shape \(4, 16\), expected \[prompts, steps, M\]"):
        import_saeuron_stats(bad, trust=True)
    with pytest.raises(ValueError, match="4 steps in the file but timesteps has shape"):
        import_saeuron_stats(p, trust=True, timesteps=torch.zeros(3))


def test_default_timesteps_are_diffusers_ddim_leading():
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DDIMScheduler(num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    s.set_timesteps(100)
    assert ddim_leading_timesteps(100).tolist() == s.timesteps.double().tolist()


def test_empty_selection_warns_and_round_trips(tmp_path, caplog):
    stats = ConceptStats(("a", "b"), torch.tensor([1.0, 0.0], dtype=torch.float64),
                         torch.ones(2, 2, 10, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64))
    with caplog.at_level("WARNING"):
        d = build_concept_dictionary(stats, SelectionRule("percentile", percentile=50.0))
    assert "selects no latent at some timesteps" in caplog.text
    assert d.latents.shape == (2, 2, 0)
    d.save(tmp_path / "empty.safetensors")
    e = load_concepts(tmp_path / "empty.safetensors")
    assert e.at(0.5).latents.numel() == 0 and e.at(0.5).timestep == 1.0  # a tie goes to the first stored step


# -- the "specific" rule ---------------------------------------------------------------------------


def ref_specific(rows_by_concept, c, max_ratio, min_rate, top_n):
    """Independent NumPy version from the rule's definition: rows_by_concept[name] = list of [n, M] arrays
    (one per prompt) at one timestep -> selected ids, best r_c - r_notc first."""
    names = list(rows_by_concept)
    pos = np.concatenate(rows_by_concept[names[c]])
    neg = np.concatenate([r for i, n in enumerate(names) if i != c for r in rows_by_concept[n]])
    rc, rn = (pos > 0).mean(0), (neg > 0).mean(0)
    ok = np.nonzero((rn <= max_ratio * rc) & (rc >= min_rate) & (rc > 0))[0]
    return ok[np.argsort(-(rc - rn)[ok], kind="stable")][:top_n].tolist()


@pytest.mark.parametrize("max_ratio,min_rate,top_n", [(0.2, 0.0, 50), (0.5, 0.1, 3), (0.0, 0.0, 50)])
def test_specific_rule_matches_reference(max_ratio, min_rate, top_n):
    M = 40
    acc = ConceptStatsAccumulator(M)
    g = torch.Generator().manual_seed(5)
    rows = {}
    for name, n_prompts in (("red", 3), ("contrast", 4)):
        for t in (999.0, 1.0):
            for _ in range(n_prompts):
                # sparse codes: each latent active with its own probability, larger for "red" on latents 0..9
                p = torch.full((M,), 0.15)
                if name == "red":
                    p[:10] = torch.linspace(0.05, 0.6, 10)
                else:
                    p[:10] = torch.linspace(0.0, 0.3, 10)
                codes = torch.rand(5, 4, M, generator=g) * (torch.rand(5, 4, M, generator=g) < p)
                acc.add(name, t, codes)
                rows.setdefault(t, {}).setdefault(name, []).append(codes.reshape(-1, M).numpy())
    stats = acc.stats()
    for ci, name in enumerate(stats.names):
        for ti, t in enumerate(stats.timesteps.tolist()):
            allrows = np.concatenate(rows[t][name])
            np.testing.assert_allclose(stats.rates[ci, ti].numpy(), (allrows > 0).mean(0))
    rule = SelectionRule("specific", top_n=top_n, max_ratio=max_ratio, min_rate=min_rate)
    d = build_concept_dictionary(stats, rule, keep=["red"])
    for ti, t in enumerate(stats.timesteps.tolist()):
        got = d.latents[0, ti][d.latents[0, ti] >= 0].tolist()
        assert got == ref_specific(rows[t], 0, max_ratio, min_rate, top_n)
        # SAeUron thresholds (mean over concepts of the mean codes) for the selected latents
        tau = (stats.means[0, ti] + stats.means[1, ti]) / 2
        torch.testing.assert_close(d.thresholds[0, ti, :len(got)], tau[got].float())
    if max_ratio == 0.2:
        assert d.latents.ge(0).any(), "the planted specific latents should be found"


def test_sample_rates_match_rows_of_kept_images():
    """sample_rates over some kept images = the share of their patches where each latent exceeds fire_above,
    computed here from the raw codes (TopK-sparse, so the kept top codes are all of them)."""
    M, top = 12, 3
    acc = ConceptStatsAccumulator(M, fire_above=0.5, keep_samples=True, sample_top=top)
    g = torch.Generator().manual_seed(2)
    raw = {}
    for job in range(4):
        for t in (999.0, 1.0):
            dense = torch.rand(2, 3, 3, M, generator=g) * 2
            codes = torch.zeros_like(dense).scatter(-1, dense.topk(top, -1).indices, dense.topk(top, -1).values)
            acc.add("x", t, codes, sample=job)
            raw[(job, t)] = codes
    keys = [("x", 1, 0), ("x", 3, 1), ("x", 0, 1)]
    got = acc.sample_rates(keys, torch.tensor([999.0, 1.0], dtype=torch.float64))
    for ti, t in enumerate((999.0, 1.0)):
        rows = np.concatenate([raw[(j, t)][b].reshape(-1, M).numpy() for _, j, b in keys])
        np.testing.assert_allclose(got[ti].numpy(), (rows > 0.5).mean(0))
    ts2 = torch.tensor([999.0, 1.0], dtype=torch.float64)
    both = acc.group_rates([keys[:1], keys[1:]], ts2)  # one [T, M] per group, each its own images only
    torch.testing.assert_close(both, torch.stack([acc.sample_rates(keys[:1], ts2), acc.sample_rates(keys[1:], ts2)]))
    assert not torch.equal(both[0], both[1])
    assert acc.group_rates([], ts2).shape == (0, 2, M)
    with pytest.raises(ValueError, match="no kept image"):
        acc.sample_rates([("y", 0, 0)], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="no codes at timestep"):
        acc.sample_rates(keys, torch.tensor([500.0]))
    with pytest.raises(ValueError, match="empty contrast group"):
        acc.sample_rates([], torch.tensor([1.0]))


@pytest.mark.parametrize("max_ratio", [0.2, 0.5])
def test_specific_rule_negatives_reject_latents_firing_on_one_group(max_ratio):
    """A latent silent on the pooled contrast but firing on one contrast group (a neighbouring concept) is kept
    without negatives and dropped with them; reference: the rule's definition in NumPy, group by group."""
    M, T = 30, 2
    g = torch.Generator().manual_seed(7)
    rc = torch.rand(T, M, generator=g, dtype=torch.float64) * 0.3 + 0.05
    rn = rc * torch.rand(T, M, generator=g, dtype=torch.float64) * 0.3  # pooled: mostly within max_ratio
    groups = torch.rand(3, T, M, generator=g, dtype=torch.float64) * 0.1 * rc
    groups[1, :, 4] = 0.9 * rc[:, 4]  # latent 4 fires on group 1 almost as often as on the concept
    rule = SelectionRule("specific", top_n=M, max_ratio=max_ratio, min_rate=0.0)
    _, plain = specific_latents(rc, rn, rule)
    _, strict = specific_latents(rc, rn, rule, groups)
    a, b, n = rc.numpy(), rn.numpy(), groups.numpy()
    for t in range(T):
        ok = (b[t] <= max_ratio * a[t]) & (a[t] > 0)
        want_plain = set(np.nonzero(ok)[0].tolist())
        want_strict = set(np.nonzero(ok & (n[:, t] <= max_ratio * a[t]).all(0))[0].tolist())
        assert set(plain[t].tolist()) == want_plain and set(strict[t].tolist()) == want_strict
        assert 4 not in want_strict and want_strict < want_plain
    with pytest.raises(ValueError, match="negatives"):
        specific_latents(rc, rn, rule, groups[:, :, :5])
    _, none = specific_latents(rc, rn, rule, groups[:0])  # no group: the plain rule
    assert [x.tolist() for x in none] == [x.tolist() for x in plain]


def test_specific_rule_needs_rates():
    stats = random_stats(C=2)  # means only, as imported SAeUron statistics
    with pytest.raises(ValueError, match="needs firing rates"):
        build_concept_dictionary(stats, SelectionRule("specific"))
