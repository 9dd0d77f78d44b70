"""The node modules' pure logic, without ComfyUI: hook glue with fakes, masks, grid, prompt parsing, folders."""

import copy
import math
import types

import pytest
import torch

from nodes import comfy_steps, folders, grid, hook, learn, masks, resolve
from sae_core.errors import SAEInputError
from sae_core.intervention import Recorder, StepInfo

# ------------------------------------------------------------------------------------------------ fakes


class FakeSampling:
    """Log-linear discrete schedule like ModelSamplingDiscrete: t in 0..999, sigma(t) = exp(t / 200) - 0.99."""

    sig = torch.exp(torch.arange(1000, dtype=torch.float64) / 200.0) - 0.99

    def timestep(self, sigma):
        d = (self.sig.log()[:, None] - sigma.double().log()[None]).abs()
        return d.argmin(0).view(sigma.shape)

    def percent_to_sigma(self, p):
        if p <= 0:
            return 999999999.9
        if p >= 1:
            return 0.0
        return float(self.sig[int(round((1 - p) * 999))])


class FakePatcher:
    """The ModelPatcher surface install_patch uses."""

    def __init__(self, modules):
        self.modules = modules
        self.object_patches = {}
        self.wrappers = {}
        self.model_options = {"transformer_options": {}}
        self.model = types.SimpleNamespace(model_config=None)

    def clone(self):
        n = FakePatcher(self.modules)
        n.object_patches = dict(self.object_patches)
        n.wrappers = {k: {kk: list(v) for kk, v in d.items()} for k, d in self.wrappers.items()}
        n.model_options = copy.deepcopy(self.model_options)
        n.model = self.model
        return n

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        if name == "model_sampling":
            return FakeSampling()
        obj = self.modules[name.rsplit(".", 1)[0]] if name.endswith(".forward") else self.modules[name]
        return obj.forward if name.endswith(".forward") else obj

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def add_wrapper_with_key(self, wtype, key, fn):
        self.wrappers.setdefault(wtype, {}).setdefault(key, []).append(fn)

    def run(self, key, x, transformer_options):
        """What a sampler run does: the OUTER_SAMPLE wrappers around one call of the (patched) forward."""
        fwd = self.get_model_object(key + ".forward")
        wrappers = [w for d in self.wrappers.values() for ws in d.values() for w in ws]

        def call(i):
            if i == len(wrappers):
                return fwd(x, None, transformer_options)
            return wrappers[i](_Exec(types.SimpleNamespace(model_patcher=self), lambda: call(i + 1)))

        return call(0)


class _Exec:
    """ComfyUI's WrapperExecutor surface: class_obj (the guider) and __call__ (the next layer)."""

    def __init__(self, class_obj, nxt):
        self.class_obj = class_obj
        self._next = nxt

    def __call__(self, *a, **k):
        return self._next()


class Block(torch.nn.Module):
    in_channels = 4

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006 -- ComfyUI's signature
        return x * 3.0


# ------------------------------------------------------------------------------------------------ hook


def test_step_index_maps_intermediate_sigmas_to_their_step():
    sched = torch.tensor([10.0, 5.0, 2.0, 0.5, 0.0])
    assert [comfy_steps.step_index(s, sched) for s in (10.0, 5.0, 2.0, 0.5)] == [0, 1, 2, 3]
    assert comfy_steps.step_index(3.3, sched) == 1  # a 2nd-order evaluation between s1 and s2
    assert comfy_steps.step_index(5.0 * (1 + 1e-7), sched) == 1
    assert comfy_steps.step_index(11.0, sched) is None and comfy_steps.step_index(1.0, None) is None


@pytest.mark.parametrize("chunks", [(1, 0), (0,), (0, 1, 0)])
def test_step_info_from_transformer_options(chunks):
    ms = FakeSampling()
    sched = ms.sig[[900, 600, 300]].float()
    to = {"sigmas": sched[1:2].repeat(2), "cond_or_uncond": list(chunks), "sample_sigmas": torch.cat([sched, torch.zeros(1)])}
    st = comfy_steps.step_info(to, ms)
    assert st.chunks == chunks and st.step_index == 1
    assert st.timestep == 600.0 and st.sigma == pytest.approx(float(ms.sig[600]), rel=1e-6)
    with pytest.raises(ValueError, match="has no 'sigmas'"):
        comfy_steps.step_info({"cond_or_uncond": [0]}, ms)


def test_sigma_window_uses_percent_to_sigma_and_validates():
    ms = FakeSampling()
    w = comfy_steps.sigma_window(ms, 0.25, 0.75)
    assert w.sigma_max == ms.percent_to_sigma(0.25) and w.sigma_min == ms.percent_to_sigma(0.75)
    assert comfy_steps.sigma_window(ms, 0.0, 1.0) is None
    with pytest.raises(ValueError, match=r"start_percent 0.8 and end_percent 0.2: expected 0 <= start <= end <= 1"):
        comfy_steps.sigma_window(ms, 0.8, 0.2)


def test_install_patch_chains_and_resets_per_run():
    block = Block()
    base = FakePatcher({"diffusion_model.output_blocks.4.1": block})
    ms = FakeSampling()
    key = "diffusion_model.output_blocks.4.1"
    seen = []

    def plus_one(bi, bo, st):
        seen.append(("plus", bi.clone(), bo.clone(), st))
        return bo + 1

    def times_two(bi, bo, st):
        seen.append(("times", bi.clone(), bo.clone(), st))
        return bo * 2

    s1 = hook.RunState("a", Recorder())
    s1.recorder.records.append("stale")
    m1 = hook.install_patch(base, key, plus_one, s1, "outer_sample")
    s2 = hook.RunState("b")
    m2 = hook.install_patch(m1, key, times_two, s2, "outer_sample")
    assert not base.object_patches and not base.wrappers  # input untouched
    x = torch.ones(2, 4, 3, 5)
    to = {"sigmas": torch.tensor([float(ms.sig[500])]), "cond_or_uncond": [1, 0]}
    out = m2.run(key, x, to)
    torch.testing.assert_close(out, (x * 3 + 1) * 2)
    assert [s[0] for s in seen] == ["plus", "times"]
    torch.testing.assert_close(seen[1][2], x * 3 + 1)  # the second patch sees the first one's output
    assert seen[0][3].chunks == (1, 0) and seen[0][3].timestep == 500.0
    assert s1.recorder.records == [] and s1.active == 0 and s2.active == 0 and s1.runs == 1
    # outside a run the patch is inert
    torch.testing.assert_close(m2.get_model_object(key + ".forward")(x, None, to), x * 3)
    # deep copies keep the holder
    assert list(m2.clone().model_options["transformer_options"][hook.OPTIONS_KEY].values()) == [s1, s2]


def test_wrapper_releases_state_when_the_run_fails():
    block = Block()
    base = FakePatcher({"diffusion_model.middle_block.1": block})
    key = "diffusion_model.middle_block.1"

    def boom(bi, bo, st):
        raise RuntimeError("inside")

    s = hook.RunState("x")
    m = hook.install_patch(base, key, boom, s, "outer_sample")
    with pytest.raises(RuntimeError, match="inside"):
        m.run(key, torch.ones(1, 4, 2, 2), {"sigmas": torch.tensor([1.0]), "cond_or_uncond": [0]})
    assert s.active == 0 and s.model_sampling is None


def test_family_of_config_by_class_hierarchy():
    SD15 = type("SD15", (), {})
    SDXL = type("SDXL", (), {})
    assert resolve.family_of_config(type("SD15_instructpix2pix", (SD15,), {})()) == "sd1"
    assert resolve.family_of_config(SDXL()) == "sdxl"
    assert resolve.family_of_config(type("Flux", (), {})()) == "flux"  # DiT families: tests/test_blocks_dit.py
    assert resolve.family_of_config(type("HunyuanDiT", (), {})()) is None


# ------------------------------------------------------------------------------------------------ masks


def _recorder_with(maps_by_step, branch=0):
    rec = Recorder()
    for s, m in enumerate(maps_by_step):
        score = torch.where(m, torch.tensor(2.0), torch.tensor(-1.0))[None]
        rec.add("blk", StepInfo(timestep=900.0 - 100 * s, step_index=s, chunks=(branch,)), branch, 0, m[None],
                score, torch.zeros(1, dtype=torch.bool))
    return rec


@pytest.mark.parametrize("hw", [(3, 5), (4, 2)])
def test_pick_step_and_aggregates(hw):
    g = torch.Generator().manual_seed(1)
    steps = [torch.rand(hw, generator=g) > 0.5 for _ in range(4)]
    rec = _recorder_with(steps)
    keys, maps = masks.recorded_maps(rec, "mask", "cond", 0)
    assert keys == [0, 1, 2, 3]
    stack = torch.stack(steps).float()
    torch.testing.assert_close(masks.pick_step(keys, maps, 2, "max"), stack[2])
    torch.testing.assert_close(masks.pick_step(keys, maps, -1, "max"), stack.max(0).values)
    torch.testing.assert_close(masks.pick_step(keys, maps, -1, "mean"), stack.mean(0))
    torch.testing.assert_close(masks.pick_step(keys, maps, -1, "last"), stack[-1])
    with pytest.raises(ValueError, match=r"step 9 was not recorded; recorded steps: \[0, 1, 2, 3\]"):
        masks.pick_step(keys, maps, 9, "max")
    with pytest.raises(ValueError, match="aggregate is 'median'"):
        masks.pick_step(keys, maps, -1, "median")
    _, scores = masks.recorded_maps(rec, "score", "cond", 0)
    torch.testing.assert_close(scores, stack * 2)  # margins clamped at 0
    # cfg 1: no uncond pass was ever recorded; the pack's own error says why and what to choose
    with pytest.raises(SAEInputError, match=r"branch 'uncond' recorded nothing; recorded branches: \['cond'\]\. At cfg 1"):
        masks.recorded_maps(rec, "mask", "uncond", 0)


@pytest.mark.parametrize("grid_hw,img_hw", [((3, 4), (96, 128)), ((13, 9), (100, 70)), ((2, 3), (2, 3))])
def test_upscale_cell_mapping(grid_hw, img_hw):
    h, w = grid_hw
    H, W = img_hw
    g = torch.arange(h * w, dtype=torch.float32).view(h, w)
    up = masks.upscale(g, H, W)
    assert up.shape == (H, W)
    for y in (0, H // 3, H - 1):
        for x in (0, W // 2, W - 1):
            assert up[y, x] == g[math.floor(y * h / H), math.floor(x * w / W)]


def test_overlay_math_and_errors():
    img = torch.full((1, 2, 3, 3), 0.5)
    m = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]]])
    out = masks.overlay(img, m, masks.parse_color("#ff0000"), 0.5)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.75, 0.25, 0.25]))
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([0.5, 0.5, 0.5]))
    torch.testing.assert_close(out[0, 0, 2], torch.tensor([0.625, 0.375, 0.375]))
    with pytest.raises(ValueError, match="color is 'red'"):
        masks.parse_color("red")
    with pytest.raises(ValueError, match=r"maps have shape \(1, 3, 2\), expected \(1, 2, 3\)"):
        masks.overlay(img, m.transpose(1, 2), (1, 0, 0), 0.5)
    with pytest.raises(ValueError, match="opacity is 2"):
        masks.overlay(img, m, (1, 0, 0), 2)


# ------------------------------------------------------------------------------------------------ grid


def test_compare_grid_places_panels_and_labels():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 20, 30, 3, generator=g)
    b = torch.rand(2, 40, 20, 3, generator=g)  # taller: resized to 20 high, 10 wide; batch 2
    out = grid.compare_grid([a, b], ["A", "B"])
    assert out.shape == (2, 20 + grid.BAR, 30 + grid.GAP + 10, 3)
    torch.testing.assert_close(out[0, grid.BAR:, :30], a[0])
    torch.testing.assert_close(out[1, grid.BAR:, :30], a[0])  # shorter batch repeats its last image
    assert (out[0, : grid.BAR, :30] > 0.5).any()  # text pixels are light on the dark bar
    with pytest.raises(ValueError, match="Compare takes 2 or 3 images, got 1"):
        grid.compare_grid([a], ["A"])
    with pytest.raises(ValueError, match=r"image 2 has shape \(20, 30, 3\)"):
        grid.compare_grid([a, a[0]], ["A", "B"])


# ------------------------------------------------------------------------------------------------ learn


def test_prompt_and_latent_parsing():
    assert learn.parse_prompts("a cat\n\n  # note\n a dog  \n") == ["a cat", "a dog"]
    assert learn.parse_latent_ids("12, 40 7;3") == [12, 40, 7, 3] and learn.parse_latent_ids("  ") == []
    with pytest.raises(ValueError, match=r"\['x1', '-2'\] are not non-negative integers"):
        learn.parse_latent_ids("3, x1, -2")
    assert len(set(learn.DEFAULT_CONTRAST)) >= 8


def test_keep_negatives_are_each_keep_runs_firing_rates():
    """keep_negatives stacks, per keep prompt's sample id, the share of that run's patches (all its images) where
    each latent exceeds fire_above; reference computed here from the raw TopK codes."""
    from sae_core.concept_stats import ConceptStatsAccumulator

    M, top, ts = 10, 3, (999.0, 500.0, 1.0)
    acc = ConceptStatsAccumulator(M, fire_above=0.25, keep_samples=True, sample_top=top)
    g = torch.Generator().manual_seed(5)
    raw = {}
    for job, (label, batch) in enumerate([("cat", 1), ("__contrast__", 1), ("__contrast__", 2), ("__contrast__", 1)]):
        for t in ts:
            dense = torch.rand(batch, 2, 3, M, generator=g)
            v, i = dense.topk(top, -1)
            codes = torch.zeros_like(dense).scatter(-1, i, v)
            acc.add(label, t, codes, sample=job)
            raw[(job, t)] = codes
    got = learn.keep_negatives(acc, [2, 3], torch.tensor(ts, dtype=torch.float64))
    assert got.shape == (2, len(ts), M) and got.dtype == torch.float64
    for gi, job in enumerate([2, 3]):
        for ti, t in enumerate(ts):
            want = (raw[(job, t)].reshape(-1, M) > 0.25).double().mean(0)
            torch.testing.assert_close(got[gi, ti], want, rtol=0, atol=1e-12)
    assert got[0].ne(got[1]).any(), "two different runs should give different rates"
    assert learn.keep_negatives(acc, [], torch.tensor(ts)).shape == (0, len(ts), M)
    with pytest.raises(ValueError, match=r"no images were recorded for keep prompt run 7; recorded runs are \[0, 1, 2, 3\]"):
        learn.keep_negatives(acc, [7], torch.tensor(ts))


@pytest.mark.parametrize("share, k, says", [
    (0.0, 4, False), (0.2, 4, False), (0.25, 4, False), (0.26, 4, True),  # 1/k itself is still an equal part
    (0.1, 8, False), (0.2, 8, True), (0.05, 32, True), (0.9, None, False),  # k None: no TopK, nothing to compare
])
def test_min_share_hint_only_above_one_over_k(share, k, says):
    """Concept Detector's min_share note: said only when the share asks for more than 1/k of a TopK code, and then
    naming the share, 1/k, k and 0.8/k."""
    hint = resolve.min_share_hint(share, k)
    assert (hint is not None) is says
    if says:
        for part in (f"min_share {share:g}", f"1/k = {1 / k:.3g}", f"k={k}", f"0.8/k = {0.8 / k:.2g}", "Mask Preview"):
            assert part in hint, hint


def test_steps_without_latents_lists_empty_steps_of_the_concept():
    lat = torch.tensor([[[3, -1], [-1, -1], [0, 5], [-1, -1]], [[-1, -1], [1, -1], [-1, -1], [2, -1]]])
    concept = types.SimpleNamespace(latents=lat)
    assert learn.steps_without_latents(concept) == [1, 3]
    assert learn.steps_without_latents(concept, 1) == [0, 2]


# ------------------------------------------------------------------------------------------------ folders


class FakeFolders:
    def __init__(self, root):
        self.models_dir = str(root)
        self.folder_names_and_paths = {}

    def get_folder_paths(self, name):
        return list(self.folder_names_and_paths[name][0])

    def get_filename_list(self, name):
        import os

        paths, exts = self.folder_names_and_paths[name]
        out = []
        for p in paths:
            for dirpath, _, files in os.walk(p):
                for f in files:
                    if os.path.splitext(f)[1] in exts:
                        out.append(os.path.relpath(os.path.join(dirpath, f), p))
        return sorted(out)

    def get_full_path(self, name, rel):
        import os

        for p in self.folder_names_and_paths[name][0]:
            if os.path.isfile(os.path.join(p, rel)):
                return os.path.join(p, rel)
        return None


def test_register_keeps_extra_paths_and_filters(tmp_path):
    f = FakeFolders(tmp_path / "models")
    f.folder_names_and_paths["sae"] = (["/elsewhere/sae"], set())  # from extra_model_paths.yaml
    folders.register(f)
    assert f.folder_names_and_paths["sae"] == (["/elsewhere/sae", str(tmp_path / "models" / "sae")], {".safetensors"})
    assert f.folder_names_and_paths["sae_concepts"] == ([str(tmp_path / "models" / "sae_concepts")], {".safetensors"})


def test_list_and_resolve_sae_entries(tmp_path):
    f = FakeFolders(tmp_path / "models")
    folders.register(f)
    root = tmp_path / "models" / "sae"
    (root / "runs" / "up_blocks.1.attentions.1").mkdir(parents=True)
    (root / "runs" / "up_blocks.1.attentions.1" / "cfg.json").write_text("{}")
    (root / "runs" / "up_blocks.1.attentions.1" / "sae.safetensors").write_bytes(b"x")
    (root / "native.safetensors").write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    entries = folders.list_sae_entries(f)
    assert entries == ["native.safetensors", "runs/up_blocks.1.attentions.1/"]
    assert folders.resolve_sae_entry(f, entries[1]) == str(root / "runs" / "up_blocks.1.attentions.1")
    assert folders.resolve_sae_entry(f, entries[0]) == str(root / "native.safetensors")
    with pytest.raises(FileNotFoundError, match="'gone.safetensors' not found under models/sae"):
        folders.resolve_sae_entry(f, "gone.safetensors")


def test_concept_save_path_refuses_paths(tmp_path):
    f = FakeFolders(tmp_path / "models")
    folders.register(f)
    assert folders.concept_save_path(f, "cat.safetensors").endswith("sae_concepts/cat.safetensors")
    for bad in ("../x", "a/b", ".hidden", " "):
        with pytest.raises(ValueError, match="expected a plain name"):
            folders.concept_save_path(f, bad)


def test_default_contrast_never_names_the_concept():
    kept, dropped = learn.default_contrast("cat", ["a photo of a cat"])
    assert dropped == ["a cat sleeping on a sofa"] and "a cat sleeping on a sofa" not in kept
    assert len(kept) == len(learn.DEFAULT_CONTRAST) - 1
    # plural and name-only words; generic words ("photo", "painting") never count as the concept
    assert learn.default_contrast("cars", ["a photo of cars"])[1] == ["a red car parked on the road"]
    assert learn.default_contrast("concept", ["a photo of something"])[1] == []
    assert learn.concept_words("van_gogh", ["a painting by van gogh", "starry night, van gogh style"]) == {"van", "gogh"}
    # words shared by every concept prompt count even when the name is arbitrary
    assert learn.default_contrast("my_thing", ["a castle at dusk", "an old castle"])[1] == ["an old castle on a hill"]
    # every default prompt names something: learning each of its nouns drops that scene
    for noun in ("mountain", "street", "fruit", "woman", "car", "cat", "pasta", "beach", "castle"):
        kept, dropped = learn.default_contrast(noun, [f"a {noun}"])
        assert len(dropped) == 1 and not learn.prompts_naming(kept, {noun})
