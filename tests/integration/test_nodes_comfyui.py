"""Every node through ComfyUI's real sampler on tiny SD1/SDXL UNets; references computed here, independently."""

import copy

import comfy.model_management
import comfy.patcher_extension
import folder_paths
import pytest
import torch
import torch.nn.functional as F
from tiny_unets import sample

OUTER = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
SD1_BLOCK = ("up_blocks.1.attentions.1", "output_blocks.4.1", 128)  # diffusers, ComfyUI, tiny width
SDXL_BLOCK = ("up_blocks.0.attentions.1", "output_blocks.1.1", 128)


# ------------------------------------------------------------------------------------------------ builders


def make_sae(pack, d, M=256, k=8, hook="up_blocks.1.attentions.1", family="sd1", input_space="output", seed=0):
    sc = pack.sae_core
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False):  # as Load SAE does
        return _make_sae(sc, g, d, M, k, hook, family, input_space)


def _make_sae(sc, g, d, M, k, hook, family, input_space):
    W_dec = torch.randn(M, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    cfg = sc.SAEConfig(d_in=d, n_latents=M, k=k, activation="relu_topk", input_space=input_space,
                       hook_point=hook, model_family=family)
    return sc.SparseAutoencoder(cfg, W_enc=torch.randn(M, d, generator=g) / d**0.5,
                                b_enc=torch.randn(M, generator=g) * 0.1, W_dec=W_dec,
                                b_dec=torch.randn(d, generator=g) * 0.05, source=f"/models/sae/tiny_{family}_{d}.safetensors")


class Capture:
    """Installed BEFORE the node's patch: records the block output the node's intervention receives."""

    def __init__(self):
        self.calls = []

    def __call__(self, block_in, block_out, step):
        self.calls.append((block_in.detach().clone(), block_out.detach().clone(), step))
        return block_out


def with_capture(pack, model, key):
    hook = pack.nodes.hook
    cap = Capture()
    state = hook.RunState("capture")
    return hook.install_patch(model, "diffusion_model." + key, cap, state, OUTER), cap


def typed_detector(pack, sae, ids, **kw):
    ext = pack.nodes.extension
    args = dict(latent_ids=", ".join(map(str, ids)), typed_threshold=0.0, threshold_scale=1.0, padding=0,
                min_region=0, start_percent=0.0, end_percent=1.0, branches="both")
    args.update(kw)
    return ext.ConceptDetectorNode.execute(sae, **args).args[0]


def replace_and_record(pack, sd1, key, det, steps, size):
    """Patch Replacer (random, one pass) with detector ``det`` sampled on SD 1.x -> (the block calls captured at
    ``key``, the detector's recorder)."""
    captured, cap = with_capture(pack, sd1.model, key)
    model, dets = pack.nodes.extension.PatchReplacer.execute(captured, det, mode="random", target="output", seed=3,
                                                             look_ahead=False).args
    sample(model, "sd1", steps=steps, **size)
    assert len(cap.calls) == steps
    return cap.calls, dets.recorder


def busy_latents(pack, sae, model, key, family, n=2, **kw):
    """Latent ids active on some but not all patches at the first step (found from a capture run)."""
    m, cap = with_capture(pack, model, key)
    sample(m, family, steps=1, **kw)
    _, out, _ = cap.calls[0]
    codes = sae.encode(out.movedim(1, -1))
    share = (codes > 0).float().flatten(0, 2).mean(0)
    order = torch.argsort((share - 0.3).abs())
    return [int(i) for i in order[:n]]


# ------------------------------------------------------------------------------------------------ references


def ref_mask(sae, block_out, latents, thresholds, scale, padding):
    """Independent detection: any selected latent above scale * threshold, then a square dilation by padding."""
    codes = sae.encode(block_out.movedim(1, -1))  # [B, H, W, M]
    fire = torch.zeros(codes.shape[:3], dtype=torch.bool)
    for i, t in zip(latents, thresholds, strict=True):
        fire |= codes[..., i] > scale * t
    return ref_dilate(fire, padding)


def ref_dilate(fire, padding):
    """A square dilation by ``padding`` patches, patch by patch."""
    if padding:
        B, H, W = fire.shape
        out = torch.zeros_like(fire)
        for y in range(H):
            for x in range(W):
                out[:, y, x] = fire[:, max(0, y - padding):y + padding + 1, max(0, x - padding):x + padding + 1].flatten(1).any(1)
        fire = out
    return fire


def ref_drop_small(mask, min_region):
    """Drop 8-connected regions of fewer than ``min_region`` patches, by flood fill."""
    out = mask.clone()
    B, H, W = mask.shape
    for b in range(B):
        seen = set()
        for y0 in range(H):
            for x0 in range(W):
                if not mask[b, y0, x0] or (y0, x0) in seen:
                    continue
                region, todo = [], [(y0, x0)]
                seen.add((y0, x0))
                while todo:
                    y, x = todo.pop()
                    region.append((y, x))
                    for ny in range(y - 1, y + 2):
                        for nx in range(x - 1, x + 2):
                            if 0 <= ny < H and 0 <= nx < W and mask[b, ny, nx] and (ny, nx) not in seen:
                                seen.add((ny, nx))
                                todo.append((ny, nx))
                if len(region) < min_region:
                    for y, x in region:
                        out[b, y, x] = False
    return out


def ref_share_mask(sae, block_out, latents, threshold, min_share, min_region, padding):
    """Independent min_share detection -> (mask, share): per patch, the selected latents' codes above threshold
    summed over the sum of all its positive codes (float64), detected where a latent fires and that share is at
    least min_share, then small regions dropped, then dilated."""
    codes = sae.encode(block_out.movedim(1, -1)).double()  # [B, H, W, M]
    mass = torch.zeros(codes.shape[:3], dtype=torch.float64)
    fire = torch.zeros(codes.shape[:3], dtype=torch.bool)
    for i in latents:
        above = codes[..., i] > threshold
        mass += torch.where(above, codes[..., i], 0.0)
        fire |= above
    total = codes.clamp_min(0).sum(-1)
    share = torch.where(total > 0, mass / total, 0.0)
    return ref_dilate(ref_drop_small(fire & (share >= min_share), min_region), padding), share


@pytest.fixture
def models_dir(tmp_path, pack):
    """models/sae and models/sae_concepts in a temporary folder, registered the way the pack does it."""
    saved = copy.deepcopy(folder_paths.folder_names_and_paths)
    temp = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    for name in ("sae", "sae_concepts"):
        (tmp_path / name).mkdir()
        folder_paths.folder_names_and_paths.pop(name, None)
        folder_paths.add_model_folder_path(name, str(tmp_path / name))  # as extra_model_paths.yaml would
    pack.nodes.folders.register(folder_paths)
    yield tmp_path
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.set_temp_directory(temp)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("cfg,batch,size", [(4.0, 1, (128, 96)), (1.0, 2, (96, 128)), (3.0, 1, (512, 384))])
def test_patch_replacer_masks_match_core_and_change_latents(pack, sd1, cfg, batch, size):
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    steps = 2
    w, h = size
    ids = busy_latents(pack, sae, sd1.model, key, "sd1", width=w, height=h, cfg=cfg)
    det = typed_detector(pack, sae, ids, padding=1)
    base = sample(sd1.model, "sd1", width=w, height=h, batch=batch, cfg=cfg, steps=steps)
    options_before = copy.deepcopy(sd1.model.model_options)

    captured, cap = with_capture(pack, sd1.model, key)
    model, detections = ext.PatchReplacer.execute(captured, det, mode="random", target="output", seed=3, look_ahead=False).args
    out = sample(model, "sd1", width=w, height=h, batch=batch, cfg=cfg, steps=steps)

    assert not torch.equal(out, base) and torch.isfinite(out).all()
    rec = detections.recorder
    assert len(cap.calls) == steps
    shares = [float(ref_mask(sae, o, ids, [0.0] * len(ids), 1.0, 1).float().mean()) for _, o, _ in cap.calls]
    assert any(0 < x < 1 for x in shares), shares  # partial masks: replacement really happens
    for s, (_, block_out, step) in enumerate(cap.calls):
        assert step.step_index == s
        ref = ref_mask(sae, block_out, ids, [0.0] * len(ids), 1.0, 1)
        gh, gw = h // 8 // 4, w // 8 // 4
        assert ref.shape[1:] == (gh, gw)
        n = batch
        for c, flag in enumerate(step.chunks):
            branch = "cond" if flag == 0 else "uncond"
            for i in range(n):
                keys, masks = rec.masks(branch, i)
                torch.testing.assert_close(masks[keys.index(s)], ref[c * n + i])
        if cfg == 1.0:
            assert step.chunks == (0,)
    # the model given to the node is unchanged
    assert not sd1.model.object_patches and sd1.model.model_options == options_before
    torch.testing.assert_close(sample(sd1.model, "sd1", width=w, height=h, batch=batch, cfg=cfg, steps=steps), base,
                               rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_identity_settings_reproduce_unpatched_latents(pack, sd1, sdxl, family):
    ext = pack.nodes.extension
    tiny = {"sd1": sd1, "sdxl": sdxl}[family]
    name, key, d = SD1_BLOCK if family == "sd1" else SDXL_BLOCK
    sae = make_sae(pack, d, hook=name, family=family)
    ids = busy_latents(pack, sae, tiny.model, key, family)
    base = sample(tiny.model, family)
    nothing = typed_detector(pack, sae, ids, typed_threshold=1e6)  # detects nothing
    m, det = ext.PatchReplacer.execute(tiny.model, nothing, mode="random", target="output", seed=0, look_ahead=False).args
    torch.testing.assert_close(sample(m, family), base, rtol=0, atol=0)
    assert det.recorder.records and not any(r.mask().any() for r in det.recorder.records)
    # gamma = 1 with preserve (typed latents have mu = 1): codes unchanged -> exact; chained on the replacer
    some = typed_detector(pack, sae, ids)
    m2, det2 = ext.SAESteer.execute(m, some, method="saeuron_scale", strength=1.0, error="preserve",
                                    detected_only=False).args
    torch.testing.assert_close(sample(m2, family), base, rtol=0, atol=0)
    assert any(r.mask().any() for r in det2.recorder.records)


@pytest.mark.parametrize("method", ["saeuron_scale", "set", "unbox_add", "gsae_add"])
@pytest.mark.parametrize("error", ["preserve", "legacy_saeuron", "none"])
def test_every_steering_mode_runs_and_edits(pack, sd1, method, error):
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    ids = busy_latents(pack, sae, sd1.model, key, "sd1")
    det = typed_detector(pack, sae, ids)
    base = sample(sd1.model, "sd1")
    m, dets = ext.SAESteer.execute(sd1.model, det, method=method, strength=-2.0 if method != "set" else 3.0,
                                   error=error, detected_only=True).args
    out = sample(m, "sd1")
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert dets.recorder.keys() == [0, 1, 2]


def test_two_patch_replacers_chained_on_one_block(pack, sd1):
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    a, b = busy_latents(pack, sae, sd1.model, key, "sd1", n=2)
    m1, d1 = ext.PatchReplacer.execute(sd1.model, typed_detector(pack, sae, [a]), mode="mean", target="output", seed=0, look_ahead=False).args
    captured, cap = with_capture(pack, m1, key)  # sits between the two patches: sees the first one's output
    m2, d2 = ext.PatchReplacer.execute(captured, typed_detector(pack, sae, [b]), mode="random", target="output", seed=1, look_ahead=False).args
    out = sample(m2, "sd1")
    only_first = sample(m1, "sd1")
    assert not torch.equal(out, only_first)
    assert d1.recorder.records and d2.recorder.records
    for s, (_, block_out, step) in enumerate(cap.calls):
        ref = ref_mask(sae, block_out, [b], [0.0], 1.0, 0)
        for c, flag in enumerate(step.chunks):
            keys, masks = d2.recorder.masks("cond" if flag == 0 else "uncond", 0)
            torch.testing.assert_close(masks[keys.index(s)], ref[c])


def test_residual_sae_on_sdxl_block(pack, sdxl):
    ext = pack.nodes.extension
    name, key, d = SDXL_BLOCK
    sae = make_sae(pack, d, hook=name, family="sdxl", input_space="residual")
    captured, cap = with_capture(pack, sdxl.model, key)
    m0, _ = with_capture(pack, sdxl.model, key)
    sample(m0, "sdxl", steps=1)
    ids = busy_latents(pack, sae, sdxl.model, key, "sdxl")
    m, dets = ext.PatchReplacer.execute(captured, typed_detector(pack, sae, ids), mode="nearest", target="residual",
                                        seed=0, look_ahead=False).args
    sample(m, "sdxl")
    for s, (block_in, block_out, step) in enumerate(cap.calls):
        ref = ref_mask(sae, block_out - block_in, ids, [0.0] * len(ids), 1.0, 0)
        for c, flag in enumerate(step.chunks):
            keys, masks = dets.recorder.masks("cond" if flag == 0 else "uncond", 0)
            torch.testing.assert_close(masks[keys.index(s)], ref[c])


def test_wrong_width_fails_before_sampling_with_documented_message(pack, sd1):
    ext = pack.nodes.extension
    sae = make_sae(pack, 64)  # output_blocks.4.1 of the tiny SD1 has 128 channels
    det = typed_detector(pack, sae, [1, 2])
    with pytest.raises(ValueError) as e:
        ext.PatchReplacer.execute(sd1.model, det, mode="random", target="output", seed=0, look_ahead=False)
    msg = str(e.value)
    for part in ("tiny_sd1_64.safetensors", "up_blocks.1.attentions.1", "diffusion_model.output_blocks.4.1",
                 "has 128 channels", "expects d_in=64"):
        assert part in msg, msg
    assert not sd1.model.object_patches


def test_window_limits_recorded_steps(pack, sd1):
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    det = typed_detector(pack, sae, [1, 2], start_percent=0.4, end_percent=1.0)
    m, dets = ext.PatchReplacer.execute(sd1.model, det, mode="random", target="output", seed=0, look_ahead=False).args
    sample(m, "sd1", steps=6)
    ms = sd1.model.get_model_object("model_sampling")
    import comfy.samplers

    sig = comfy.samplers.calculate_sigmas(ms, "normal", 6)[:-1]
    expect = [i for i, s in enumerate(sig) if float(s) <= ms.percent_to_sigma(0.4)]
    assert dets.recorder.keys() == expect and 0 < len(expect) < 6


def test_mask_preview_upscales_and_overlays(pack, sd1, models_dir):
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    ids = busy_latents(pack, sae, sd1.model, key, "sd1")
    m, dets = ext.PatchReplacer.execute(sd1.model, typed_detector(pack, sae, ids, padding=0), mode="random",
                                        target="output", seed=0, look_ahead=False).args
    sample(m, "sd1", batch=2, width=128, height=96)
    images = torch.rand(2, 96, 128, 3, generator=torch.Generator().manual_seed(0))
    res = ext.MaskPreview.execute(dets, images, step=-1, aggregate="max", branch="cond", show="mask", opacity=0.5,
                                  color="#ff0000")
    overlay_img, mask = res.args
    assert mask.shape == (2, 96, 128) and res.ui is not None
    for i in range(2):
        keys, grids = dets.recorder.masks("cond", i)
        g = grids.any(0).float()  # [3, 4] grid, each cell 32x32 pixels
        assert 0 < float(g.mean()) < 1
        ref = g.repeat_interleave(32, 0).repeat_interleave(32, 1)
        torch.testing.assert_close(mask[i], ref)
        red = torch.tensor([1.0, 0.0, 0.0])
        torch.testing.assert_close(overlay_img[i], images[i] * (1 - 0.5 * ref[..., None]) + red * 0.5 * ref[..., None])
    last = ext.MaskPreview.execute(dets, images, step=2, aggregate="max", branch="uncond", show="score",
                                   opacity=1.0, color="#00ff00").args[1]
    assert last.min() >= 0 and last.max() <= 1
    with pytest.raises(ValueError, match=r"step 7 was not recorded; recorded steps: \[0, 1, 2\]"):
        ext.MaskPreview.execute(dets, images, step=7, aggregate="max", branch="cond", show="mask", opacity=0.5,
                                color="#ff0000")


class FakeClip:
    """Text -> a fixed random embedding per prompt (ComfyUI's CLIP API: tokenize + encode_from_tokens_scheduled)."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        seed = sum(ord(c) * (i + 1) for i, c in enumerate(tokens)) % (2**31)
        g = torch.Generator().manual_seed(seed)
        return [[torch.randn(1, 5, 32, generator=g), {}]]


def test_learn_concept_scores_match_independent_build(pack, sd1, models_dir):
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d, M=64)
    captured, cap = with_capture(pack, sd1.model, key)
    prompts, contrast = ["a cat", "a cat on a mat"], ["a dog", "a house"]
    kw = dict(concept_name="cat", concept_prompts="\n".join(prompts), contrast_prompts="\n".join(contrast),
              negative_prompt="", width=64, height=64, steps=2, cfg=3.0, sampler_name="euler",
              scheduler="normal", seed=188, selection="top_n", percentile=99.0, top_n=2)
    concept = ext.LearnConcept.execute(captured, FakeClip(), sae, **kw).args[0]
    assert concept.names == ("cat",) and not sd1.model.object_patches
    # reference: cond rows' mean code per prompt group and timestep, SAeUron scores, top 2
    assert len(cap.calls) == 4 * 2
    mu = {"cat": [], "other": []}
    for p in range(4):
        per_t = []
        for s in range(2):
            _, out, step = cap.calls[p * 2 + s]
            rows = out[[c for c, f in enumerate(step.chunks) if f == 0]]
            per_t.append(sae.encode(rows.movedim(1, -1)).flatten(0, 2).double().mean(0))
        mu["cat" if p < 2 else "other"].append(torch.stack(per_t))
    mc, mn = torch.stack(mu["cat"]).mean(0), torch.stack(mu["other"]).mean(0)
    score = mc / (mc.sum(-1, keepdim=True) + 1e-8) - mn / (mn.sum(-1, keepdim=True) + 1e-8)
    ms = sd1.model.get_model_object("model_sampling")
    ts = [float(ms.timestep(st.sigma * torch.ones(1))) for _, _, st in cap.calls[:2]]
    for s in range(2):
        t = concept.timestep_index(ts[s])
        got = [int(i) for i in concept.latents[0, t] if i >= 0]
        assert set(got) == set(torch.topk(score[s], 2).indices.tolist())


def test_learn_concept_specific_matches_firing_rate_reference(pack, sd1):
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d, M=64)
    captured, cap = with_capture(pack, sd1.model, key)
    kw = dict(concept_name="cat", concept_prompts="a cat\na cat on a mat", contrast_prompts="a dog\na house",
              negative_prompt="", width=64, height=64, steps=2, cfg=3.0, sampler_name="euler",
              scheduler="normal", seed=188, selection="specific", percentile=99.0, top_n=5)
    concept = ext.LearnConcept.execute(captured, FakeClip(), sae, **kw).args[0]
    assert concept.meta.selection["method"] == "specific" and not sd1.model.object_patches
    # reference: share of cond patches where each latent fires, concept prompts vs contrast, per step
    rates = {"cat": [], "other": []}
    for p in range(4):
        per_t = []
        for s in range(2):
            _, out, step = cap.calls[p * 2 + s]
            rows = out[[c for c, f in enumerate(step.chunks) if f == 0]]
            per_t.append((sae.encode(rows.movedim(1, -1)).flatten(0, 2) > 0).double().mean(0))
        rates["cat" if p < 2 else "other"].append(torch.stack(per_t))
    rc, rn = torch.stack(rates["cat"]).mean(0), torch.stack(rates["other"]).mean(0)
    ms = sd1.model.get_model_object("model_sampling")
    ts = [float(ms.timestep(st.sigma * torch.ones(1))) for _, _, st in cap.calls[:2]]
    picked = 0
    for s in range(2):
        ok = ((rn[s] <= 0.2 * rc[s]) & (rc[s] >= 0.002) & (rc[s] > 0)).nonzero().flatten()
        want = ok[torch.argsort(rc[s][ok] - rn[s][ok], descending=True, stable=True)][:5].tolist()
        t = concept.timestep_index(ts[s])
        assert [int(i) for i in concept.latents[0, t] if i >= 0] == want
        picked += len(want)
    assert picked > 0, "the reference selects nothing: the test would not see a wrong selection"
    # max_ratio reaches the rule: the same codes, a looser ratio, the reference's (different) selection
    cap.calls.clear()
    loose = ext.LearnConcept.execute(captured, FakeClip(), sae, **kw, max_ratio=0.5).args[0]
    assert loose.meta.selection["max_ratio"] == 0.5 and len(cap.calls) == 8
    added = 0
    for s in range(2):
        want = specific_reference(rc[s], rn[s], [], 5, max_ratio=0.5)
        t = loose.timestep_index(ts[s])
        assert [int(i) for i in loose.latents[0, t] if i >= 0] == want
        added += len(set(want) - {int(i) for i in concept.latents[0, concept.timestep_index(ts[s])] if i >= 0})
    assert added > 0, "0.5 selects what 0.2 does: the test would not see max_ratio ignored"


def cond_rates(sae, cap, n_prompts, steps):
    """[P, T, M]: per sampled prompt and step, the share of its cond patches where each latent fires."""
    out = []
    for p in range(n_prompts):
        per_t = []
        for s in range(steps):
            _, block_out, step = cap.calls[p * steps + s]
            rows = block_out[[c for c, f in enumerate(step.chunks) if f == 0]]
            per_t.append((sae.encode(rows.movedim(1, -1)).flatten(0, 2) > 0).double().mean(0))
        out.append(torch.stack(per_t))
    return torch.stack(out)


def specific_reference(rc, rn, groups, top_n, max_ratio=0.2, min_rate=0.002):
    """The 'specific' rule written from its definition: ids, best r_c - r_notc first."""
    ok = (rn <= max_ratio * rc) & (rc >= min_rate) & (rc > 0)
    for g in groups:
        ok &= g <= max_ratio * rc
    ids = ok.nonzero().flatten()
    return ids[torch.argsort(rc[ids] - rn[ids], descending=True, stable=True)][:top_n].tolist()


def test_learn_concept_keep_prompts_are_hard_negatives(pack, sd1, models_dir):
    """keep_prompts: sampled as contrast (pooled r_notc over contrast + keep prompts) and, with 'specific', every
    kept latent stays at or below max_ratio * r_c on each keep prompt alone; reference from the captured codes."""
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d, M=128, seed=2)  # a seed where the keep prompts drop 2 of the pooled rule's 13 latents
    captured, cap = with_capture(pack, sd1.model, key)
    steps, top_n = 2, 64
    kw = dict(concept_name="cat", concept_prompts="a cat\na cat on a mat", contrast_prompts="a dog\na house",
              negative_prompt="", width=64, height=64, steps=steps, cfg=3.0, sampler_name="euler",
              scheduler="normal", seed=188, selection="specific", percentile=99.0, top_n=top_n)
    keep = ["a blue car", "a red ball"]
    concept = ext.LearnConcept.execute(captured, FakeClip(), sae, **kw, keep_prompts="\n".join(keep)).args[0]
    assert not sd1.model.object_patches and len(cap.calls) == 6 * steps
    assert concept.meta.prompts == {"cat": ["a cat", "a cat on a mat"], "__contrast__": ["a dog", "a house"],
                                    "__keep__": keep}
    rates = cond_rates(sae, cap, 6, steps)
    rc, rn = rates[:2].mean(0), rates[2:].mean(0)  # keep prompts join the pooled contrast
    ms = sd1.model.get_model_object("model_sampling")
    ts = [float(ms.timestep(st.sigma * torch.ones(1))) for _, _, st in cap.calls[:steps]]
    dropped = picked = 0
    for s in range(steps):
        want = specific_reference(rc[s], rn[s], rates[4:, s], top_n)
        t = concept.timestep_index(ts[s])
        assert [int(i) for i in concept.latents[0, t] if i >= 0] == want
        dropped += len(set(specific_reference(rc[s], rn[s], [], top_n)) - set(want))
        picked += len(want)
    assert dropped > 0, "the keep prompts exclude nothing: the test would not see them ignored"
    assert picked > 0, "the reference keeps nothing: the test would not see a wrong selection"
    # the concept file keeps the keep prompts
    ext.SaveConcept.execute(concept, filename="cat_keep", overwrite=False)
    loaded = ext.LoadConcept.execute(concept_name="cat_keep.safetensors").args[0]
    assert loaded.meta.prompts["__keep__"] == keep


def test_learn_concept_keep_prompts_warnings(pack, sd1, caplog):
    ext = pack.nodes.extension
    sae = make_sae(pack, 128, M=64)
    kw = dict(concept_name="cat", concept_prompts="a cat", contrast_prompts="a dog", negative_prompt="", width=64,
              height=64, steps=2, cfg=3.0, sampler_name="euler", scheduler="normal", seed=1, selection="specific",
              percentile=99.0, top_n=3)
    base = ext.LearnConcept.execute(sd1.model, FakeClip(), sae, **kw).args[0]
    assert pack.nodes.learn.steps_without_latents(base) == [], "without keep prompts every step keeps a latent"
    # a keep prompt identical to the concept prompt: every latent fires on it as often as on the concept
    with caplog.at_level("WARNING"):
        same = ext.LearnConcept.execute(sd1.model, FakeClip(), sae, **kw, keep_prompts="a cat").args[0]
    assert "keep prompts ['a cat'] contain the concept's words ['cat']" in caplog.text
    assert "selects no latent at 2 of 2 steps" in caplog.text and "Use fewer keep prompts" in caplog.text
    assert pack.nodes.learn.steps_without_latents(same) == [0, 1]
    caplog.clear()
    with caplog.at_level("WARNING"):
        pooled = ext.LearnConcept.execute(sd1.model, FakeClip(), sae, **{**kw, "selection": "top_n"},
                                          keep_prompts="a blue car").args[0]
    assert "with selection 'top_n' the 1 keep prompt(s) only join the contrast set" in caplog.text
    assert pooled.meta.prompts["__keep__"] == ["a blue car"] and "fewer keep prompts" not in caplog.text
    assert "max_ratio" not in caplog.text  # the default ratio is not worth a warning
    caplog.clear()
    with caplog.at_level("WARNING"):
        ext.LearnConcept.execute(sd1.model, FakeClip(), sae, **{**kw, "selection": "top_n"}, max_ratio=0.5)
    assert "max_ratio 0.5 only applies to selection 'specific'; with 'top_n' it is ignored" in caplog.text
    with pytest.raises(ValueError, match="'__keep__' is empty or reserved"):
        ext.LearnConcept.execute(sd1.model, FakeClip(), sae, **{**kw, "concept_name": "__keep__"})
    assert not sd1.model.object_patches


def test_learn_concept_interrupt_leaves_model_clean(pack, sd1):
    ext = pack.nodes.extension
    sae = make_sae(pack, 128, M=64)
    base = sample(sd1.model, "sd1")
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            ext.LearnConcept.execute(sd1.model, FakeClip(), sae, concept_name="cat", concept_prompts="a cat",
                                     contrast_prompts="", negative_prompt="", width=64, height=64, steps=2, cfg=3.0,
                                     sampler_name="euler", scheduler="normal", seed=1, selection="top_n",
                                     percentile=99.0, top_n=2)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not sd1.model.object_patches
    torch.testing.assert_close(sample(sd1.model, "sd1"), base, rtol=0, atol=0)


def test_save_load_concept_and_load_sae_through_model_folders(pack, sd1, models_dir):
    ext = pack.nodes.extension
    sc = pack.sae_core
    sae = make_sae(pack, 1280, M=16)  # load_sae checks recorded family/hook against the real block widths
    sc.save_native(sae, models_dir / "sae" / "tiny.safetensors")
    listed = pack.nodes.folders.list_sae_entries(folder_paths)
    assert "tiny.safetensors" in listed
    loaded = ext.LoadSAE.execute("tiny.safetensors", block="from file", model_family="from file",
                                 input_space="from file", activation="from file").args[0]
    torch.testing.assert_close(loaded.W_enc, sae.W_enc)
    assert loaded.fingerprint() == sae.fingerprint()
    other = ext.LoadSAE.execute("tiny.safetensors", block="up_blocks.1.attentions.2", model_family="from file",
                                input_space="residual", activation="from file").args[0]
    assert other.cfg.hook_point == "up_blocks.1.attentions.2" and other.cfg.input_space == "residual"

    concept = sc.concepts.ConceptDictionary.from_latents([3, 5], 16, threshold=0.5, name="typed",
                                                         sae_fingerprint=sae.fingerprint())
    ext.SaveConcept.execute(concept, filename="cat", overwrite=False)
    with pytest.raises(FileExistsError, match="cat.safetensors exists"):
        ext.SaveConcept.execute(concept, filename="cat", overwrite=False)
    assert "cat.safetensors" in folder_paths.get_filename_list("sae_concepts")
    back = ext.LoadConcept.execute("cat.safetensors", sae=loaded).args[0]
    torch.testing.assert_close(back.latents, concept.latents)
    stranger = make_sae(pack, 1280, M=16, seed=5)
    with pytest.raises(sc.concepts.ConceptMismatchError):
        ext.LoadConcept.execute("cat.safetensors", sae=stranger)


def test_compare_grid_node(pack, models_dir):
    ext = pack.nodes.extension
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.rand(2, 40, 60, 3, generator=g) for _ in range(3))
    grid = ext.Compare.execute(a, b, label_a="orig", label_b="PER", label_c="steer", image_c=c).args[0]
    bar, gap = pack.nodes.grid.BAR, pack.nodes.grid.GAP
    assert grid.shape == (2, 40 + bar, 3 * 60 + 2 * gap, 3)
    torch.testing.assert_close(grid[:, bar:, :60], a)
    torch.testing.assert_close(grid[:, bar:, 60 + gap:120 + gap], b)
    torch.testing.assert_close(grid[:, bar:, 120 + 2 * gap:], c)
    assert F.mse_loss(grid[:, :bar, :60], grid[:, :bar, 60 + gap:120 + gap]) > 0  # labels differ


def test_detections_stay_tied_through_downstream_clones(pack, sd1):
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    m, dets = ext.PatchReplacer.execute(sd1.model, typed_detector(pack, sae, [1, 2]), mode="random", target="output",
                                        seed=0, look_ahead=False).args
    downstream = m.clone().clone()  # what later model nodes (LoRA, FreeU, ...) do: deep copies of model_options
    downstream.model_options["transformer_options"]["unrelated"] = 1
    sample(downstream, "sd1", steps=2)
    assert dets.recorder.keys() == [0, 1] and dets.runs == 1


@pytest.fixture(scope="module")
def sd1_bf16(comfy_threads):
    from tiny_unets import build_sd1

    with torch.inference_mode(False):
        return build_sd1(dtype=torch.bfloat16)


def test_fp32_sae_on_bf16_model_casts_lazily(pack, sd1_bf16):
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    assert sd1_bf16.model.model_dtype() == torch.bfloat16
    captured, cap = with_capture(pack, sd1_bf16.model, key)
    m, dets = ext.PatchReplacer.execute(captured, typed_detector(pack, sae, [1, 2, 3]), mode="random",
                                        target="output", seed=0, look_ahead=False).args
    out = sample(m, "sd1", steps=2)
    assert torch.isfinite(out).all() and sae.W_enc.dtype == torch.float32  # the SAE itself is not converted
    assert cap.calls[0][1].dtype == torch.bfloat16
    for s, (_, block_out, step) in enumerate(cap.calls):
        ref = ref_mask(sae, block_out, [1, 2, 3], [0.0] * 3, 1.0, 0)
        for c, flag in enumerate(step.chunks):
            keys, masks = dets.recorder.masks("cond" if flag == 0 else "uncond", 0)
            torch.testing.assert_close(masks[keys.index(s)], ref[c])
    assert (torch.device("cpu"), torch.bfloat16) in sae._cache  # weights were cast once for the activations


def test_schemas_v3_only_with_tooltips_descriptions_and_prefix(pack, models_dir):
    import asyncio

    ext = pack.nodes.extension
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS") and not hasattr(ext, "NODE_CLASS_MAPPINGS")
    nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    names = {}
    for node in nodes:
        s = node.GET_SCHEMA()
        assert s.node_id.startswith("SAE") and s.category.split("/")[0] == "SAE" and s.description
        assert all(i.tooltip for i in s.inputs), [i.id for i in s.inputs if not i.tooltip]
        assert all(o.tooltip for o in s.outputs)
        names[s.node_id] = s.display_name
    assert sorted(names.values()) == sorted(["Load SAE", "Concept Detector", "Patch Replacer", "SAE Steer",
                                             "Mask Preview", "Learn Concept", "Save Concept", "Load Concept", "Compare",
                                             "Collect Activations", "Train SAE"])
    exts = folder_paths.folder_names_and_paths
    assert exts["sae"][1] == {".safetensors"} and exts["sae_concepts"][1] == {".safetensors"}


def test_learn_concept_default_contrast_and_errors(pack, sd1, caplog):
    ext = pack.nodes.extension
    sae = make_sae(pack, 128, M=64)
    kw = dict(concept_name="cat", concept_prompts="a cat", contrast_prompts="  \n", negative_prompt="", width=64,
              height=64, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal", seed=1, selection="top_n",
              percentile=99.0, top_n=1)
    with caplog.at_level("INFO"):
        concept = ext.LearnConcept.execute(sd1.model, FakeClip(), sae, **kw).args[0]
    contrast = concept.meta.prompts["__contrast__"]
    # the built-in set without its cat scene: cat is never scored against cat
    assert contrast == [p for p in pack.nodes.learn.DEFAULT_CONTRAST if p != "a cat sleeping on a sofa"]
    assert "left ['a cat sleeping on a sofa'] out of the built-in contrast set" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        named = ext.LearnConcept.execute(sd1.model, FakeClip(), sae, **{**kw, "contrast_prompts": "two cats\na dog"})
    assert named.args[0].meta.prompts["__contrast__"] == ["two cats", "a dog"]  # the user's set is kept, but:
    assert "contrast prompts ['two cats'] contain the concept's words ['cat']" in caplog.text
    assert concept.meta.hook_point == "up_blocks.1.attentions.1" and concept.meta.model_family == "sd1"
    assert concept.meta.sae_fingerprint == sae.fingerprint() and concept.timesteps.numel() == 1
    with pytest.raises(ValueError, match="concept_prompts is empty"):
        ext.LearnConcept.execute(sd1.model, FakeClip(), sae, **{**kw, "concept_prompts": "# only a comment"})
    with pytest.raises(ValueError, match="'__contrast__' is empty or reserved"):
        ext.LearnConcept.execute(sd1.model, FakeClip(), sae, **{**kw, "concept_name": "__contrast__"})
    wrong = make_sae(pack, 64, M=64)
    with pytest.raises(ValueError, match=r"has 128 channels in this model, the SAE expects d_in=64"):
        ext.LearnConcept.execute(sd1.model, FakeClip(), wrong, **kw)
    assert not sd1.model.object_patches


def test_concept_detector_keep_masks_match_reference(pack, sd1):
    """Concept Detector's keep inputs through ComfyUI's sampler: the recorded masks equal an independent reference
    (a patch counts where one of the concept's latents fires and their share of its code reaches each kept concept's
    share), and drop patches the plain detection keeps; a kept concept named like the detected one is refused."""
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    size = dict(width=384, height=256)
    ids = busy_latents(pack, sae, sd1.model, key, "sd1", n=5, **size)
    own, other, third = ids[:2], ids[2:4], ids[4:]
    thr, steps = 0.05, 3
    dicts = pack.sae_core.concepts.ConceptDictionary
    kept = [dicts.from_latents(lat, int(sae.cfg.n_latents), threshold=thr, name=n, sae_fingerprint=sae.fingerprint())
            for lat, n in ((other, "kept"), (third, "kept_2"))]

    def run(**kw):
        det = typed_detector(pack, sae, own, typed_threshold=thr, **kw)
        return replace_and_record(pack, sd1, key, det, steps, size)

    def check(calls, rec, keep):
        n = 0
        for s, (_, block_out, step) in enumerate(calls):
            fire, mine = ref_share_mask(sae, block_out, own, thr, 0.0, 0, 0)
            ref = fire.clone()
            for lat in keep:
                theirs = ref_share_mask(sae, block_out, lat, thr, 0.0, 0, 0)[1]
                assert ((mine - theirs).abs()[fire] > 1e-5).all()  # no patch on the edge of the rule
                ref &= mine >= theirs
            for c, flag in enumerate(step.chunks):
                keys, masks = rec.masks("cond" if flag == 0 else "uncond", 0)
                torch.testing.assert_close(masks[keys.index(s)], ref[c])
            n += int(ref.sum())
        return n

    plain = check(*run(), [])
    with_keep = check(*run(keep=kept[0], keep_2=kept[1]), [other, third])
    assert 0 < with_keep < plain, (with_keep, plain)
    clash = dicts.from_latents(other, int(sae.cfg.n_latents), threshold=thr, name="typed")
    with pytest.raises(ValueError, match=r"\['typed'\] both detected and kept"):
        typed_detector(pack, sae, own, keep=clash)


@pytest.mark.parametrize("region, pad", [(0, 0), (2, 1)])
def test_concept_detector_min_share_masks_match_reference(pack, sd1, caplog, region, pad):
    """min_share through ComfyUI's sampler: the recorded masks equal an independent share reference (then
    min_region and padding), drop patches the plain detection keeps, and 0 or a prompt without the input (saved
    before it existed) give the plain detection. The node notes a share above 1/k of the SAE."""
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)  # k = 8
    size = dict(width=384, height=256)  # a 12 x 8 grid: room for regions and padding
    ids = busy_latents(pack, sae, sd1.model, key, "sd1", n=3, **size)
    thr, steps = 0.05, 3

    def run(**kw):
        det = typed_detector(pack, sae, ids, typed_threshold=thr, min_region=region, padding=pad, **kw)
        return replace_and_record(pack, sd1, key, det, steps, size)

    def check(calls, rec, share):
        kept = 0
        for s, (_, block_out, step) in enumerate(calls):
            ref, shares = ref_share_mask(sae, block_out, ids, thr, share, region, pad)
            if share > 0:  # no patch on the edge, where the order of a float sum could flip it
                assert (shares - share).abs().min() > 1e-5, (s, share)
            for c, flag in enumerate(step.chunks):
                keys, masks = rec.masks("cond" if flag == 0 else "uncond", 0)
                torch.testing.assert_close(masks[keys.index(s)], ref[c])
            kept += int(ref.sum())
        return kept

    # the share that halves the firing patches of the first step: far from 0 and 1, so the mask really changes
    m0, cap0 = with_capture(pack, sd1.model, key)
    sample(m0, "sd1", steps=1, **size)
    _, shares = ref_share_mask(sae, cap0.calls[0][1], ids, thr, 0.0, 0, 0)
    firing = shares[shares > 0].sort().values
    mid = len(firing) // 2
    share = float(firing[mid - 1] + firing[mid]) / 2
    assert 0 < share < 1 and firing[mid] - firing[mid - 1] > 1e-4, firing

    caplog.set_level("INFO")
    with_share = check(*run(min_share=share), share)
    plain = check(*run(min_share=0.0), 0.0)
    assert 0 < with_share < plain, (with_share, plain)
    assert check(*run(), 0.0) == plain  # a prompt saved before min_share existed

    above = 1 / 8 + 0.01  # k = 8: the note names 1/k and 0.8/k; below 1/k it says nothing
    caplog.clear()
    typed_detector(pack, sae, ids, min_share=above)
    assert "above 1/k = 0.125 of this SAE (k=8" in caplog.text and "0.8/k = 0.1" in caplog.text, caplog.text
    caplog.clear()
    typed_detector(pack, sae, ids, min_share=0.1)
    assert "min_share" not in caplog.text
    with pytest.raises(ValueError, match=r"min_share is 1.5, expected a share in \[0, 1\]"):
        typed_detector(pack, sae, ids, min_share=1.5)


def test_concept_detector_errors(pack):
    ext = pack.nodes.extension
    sae = make_sae(pack, 128, M=64)
    args = dict(latent_ids="", typed_threshold=0.0, threshold_scale=1.0, padding=0, min_region=0,
                start_percent=0.0, end_percent=1.0, branches="both")
    with pytest.raises(ValueError, match="no concept connected and no latent ids typed"):
        ext.ConceptDetectorNode.execute(sae, **args)
    with pytest.raises(ValueError, match=r"latent ids \[70\] out of range 0..63"):
        ext.ConceptDetectorNode.execute(sae, **{**args, "latent_ids": "3, 70"})
    with pytest.raises(ValueError, match="start_percent 0.9 and end_percent 0.1"):
        ext.ConceptDetectorNode.execute(sae, **{**args, "latent_ids": "3", "start_percent": 0.9, "end_percent": 0.1})
    other = make_sae(pack, 128, M=64, seed=9)
    learned = pack.sae_core.concepts.ConceptDictionary.from_latents([1], 64, sae_fingerprint=other.fingerprint())
    with pytest.raises(pack.sae_core.concepts.ConceptMismatchError):
        ext.ConceptDetectorNode.execute(sae, concept=learned, **args)


def test_steer_painted_mask_and_mask_preview_at_cfg_1(pack, sd1):
    """SAE Steer's optional MASK (any resolution) replaces the detector's mask on the block's grid; at cfg 1 there is
    no uncond pass and Mask Preview says so in the pack's own error."""
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    det = typed_detector(pack, sae, [1, 2])
    # 96x128 image -> this tiny block's grid 3x4, cells of 32x32 pixels: two columns of cells painted, one cell
    # exactly half painted (inside), one cell less than half (outside)
    paint = torch.zeros(1, 96, 128)
    paint[:, :, :64] = 1.0
    paint[:, :16, 64:96] = 1.0
    paint[:, :15, 96:] = 1.0
    m, dets = ext.SAESteer.execute(sd1.model, det, method="set", strength=0.0, error="preserve", detected_only=True,
                                   mask=paint, mask_mode="replace").args
    sample(m, "sd1", cfg=1.0, width=128, height=96)
    keys, grids = dets.recorder.masks("cond", 0)
    assert keys == [0, 1, 2] and grids.shape[1:] == (3, 4)
    ref = torch.zeros(3, 4, dtype=torch.bool)
    ref[:, :2] = True
    ref[0, 2] = True
    assert all(torch.equal(g, ref) for g in grids)
    images = torch.rand(1, 96, 128, 3)
    with pytest.raises(pack.sae_core.SAEInputError, match=r"branch 'uncond' recorded nothing.*At cfg 1") as e:
        ext.MaskPreview.execute(dets, images, step=-1, aggregate="max", branch="uncond", show="mask", opacity=0.5,
                                color="#ff0000")
    assert f"{type(e.value).__module__}.{type(e.value).__name__}" == "sae_core.SAEInputError"
