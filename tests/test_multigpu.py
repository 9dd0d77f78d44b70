"""The hook under the newer ComfyUI backend, driven with fakes shaped like its objects (no ComfyUI needed).

What the fakes copy from the newer ModelPatcher / sampler (checked against its source):
- ``clone(disable_dynamic=False, model_override=None, force_deepcopy=False)``; ``model_options`` copied with a
  dict/list-only deep copy (other objects shared); ON_CLONE callbacks ``callback(old, new)``;
- ``deepclone_multigpu(device)``: a clone whose ``.model`` is a fresh module tree, carrying the object patches;
- the multi-GPU cond batch: one step's chunks run in threads, one per device, each on its device's clone, with
  ``transformer_options["multigpu_thread_device"]`` set and ``sample_sigmas`` copied to the device per call.
Two devices are simulated on the CPU: the device is a name in transformer_options, the tensors stay on the CPU.
"""

import copy
import threading
import types

import pytest
import torch

from nodes import hook
from sae_core.concepts import ConceptDictionary
from sae_core.config import SAEConfig
from sae_core.detect import ConceptDetector, DetectionSettings
from sae_core.intervention import BlockIntervention, Recorder, ReplaceSettings
from sae_core.sae import SparseAutoencoder

KEY = "diffusion_model.output_blocks.4.1"
C = 8
DEVICES = ("cuda:0", "cuda:1")


def deepcopy_list_dict(obj):
    """Newer comfy.utils.deepcopy_list_dict: dicts and lists are copied, every other object is shared."""
    if isinstance(obj, dict):
        return {k: deepcopy_list_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [deepcopy_list_dict(v) for v in obj]
    return obj


class Sampling:
    """sigma -> timestep as a monotone map; percent_to_sigma linear (enough for step identity)."""

    def timestep(self, sigma):
        return (sigma * 100.0).round()

    def percent_to_sigma(self, p):
        return 10.0 * (1.0 - p)


class Block(torch.nn.Module):
    """A SpatialTransformer-shaped block: counts which instance ran, and on which device thread."""

    in_channels = C

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(C, C) * 0.5, requires_grad=False)
        self.seen = []

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006 -- ComfyUI's signature
        self.seen.append(transformer_options.get("multigpu_thread_device"))
        return torch.einsum("bchw,cd->bdhw", x, self.weight) + x


def make_model():
    root = torch.nn.Module()
    root.diffusion_model = torch.nn.Module()
    root.diffusion_model.output_blocks = torch.nn.ModuleList([torch.nn.Module() for _ in range(5)])
    root.diffusion_model.output_blocks[4] = torch.nn.ModuleList([torch.nn.Identity(), Block()])
    return root


def get_attr(root, key):
    for part in key.split("."):
        root = getattr(root, part)
    return root


class NewPatcher:
    """The surface of the newer ModelPatcher that install_patch and a multi-GPU sampler touch."""

    def __init__(self, model, load_device="cuda:0"):
        self.model = model
        self.load_device = load_device
        self.object_patches = {}
        self.wrappers = {}
        self.callbacks = {}
        self.model_options = {"transformer_options": {}}
        self.multigpu = {}

    def clone(self, disable_dynamic=False, model_override=None, force_deepcopy=False):
        model = self.model
        if force_deepcopy or model_override is not None:
            model = model_override if model_override is not None else copy.deepcopy(self.model)
        n = NewPatcher(model, self.load_device)
        n.object_patches = self.object_patches.copy()
        n.wrappers = {k: {kk: list(v) for kk, v in d.items()} for k, d in self.wrappers.items()}
        n.callbacks = {k: {kk: list(v) for kk, v in d.items()} for k, d in self.callbacks.items()}
        n.model_options = deepcopy_list_dict(self.model_options)
        for cbs in self.callbacks.get(hook.ON_CLONE, {}).values():
            for cb in cbs:
                cb(self, n)
        return n

    def deepclone_multigpu(self, device):
        pristine = make_model()
        pristine.load_state_dict(self.model.state_dict())  # the loader's fresh copy of the same weights
        n = self.clone(model_override=pristine)
        n.load_device = device
        return n

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        if name == "model_sampling":
            return Sampling()
        return get_attr(self.model, name)

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def add_wrapper_with_key(self, wtype, key, fn):
        self.wrappers.setdefault(wtype, {}).setdefault(key, []).append(fn)

    def add_callback_with_key(self, ctype, key, fn):
        self.callbacks.setdefault(ctype, {}).setdefault(key, []).append(fn)

    def forward_of(self, key):
        """What the loaded model calls: the object patch if any (ComfyUI sets it on the module), else the block."""
        return self.object_patches.get(key + ".forward", get_attr(self.model, key).forward)

    # a sampler run ---------------------------------------------------------------------------------------------
    def sample(self, xs: dict, sigmas: torch.Tensor, clones: dict | None):
        """OUTER_SAMPLE wrappers around len(sigmas)-1 steps. ``xs``: {flag: [b, C, H, W]}. With ``clones``
        ({device: patcher}) the chunks of a step run in threads, flag i on device i; else one batched call."""
        wrappers = [w for d in self.wrappers.values() for ws in d.values() for w in ws]
        outs = []

        def steps():
            for i in range(len(sigmas) - 1):
                sig = sigmas[i:i + 1]
                if clones is None:
                    flags = sorted(xs)
                    x = torch.cat([xs[f] for f in flags])
                    to = {"sigmas": sig, "sample_sigmas": sigmas, "cond_or_uncond": flags}
                    outs.append(self.forward_of(KEY)(x, None, to))
                    continue
                res, errs = {}, []

                def work(dev, flag, sig=sig, res=res, errs=errs):
                    try:
                        to = {"sigmas": sig.clone(), "sample_sigmas": sigmas.clone(),  # .to(device): a new tensor
                              "cond_or_uncond": [flag], "multigpu_thread_device": dev}
                        res[flag] = clones[dev].forward_of(KEY)(xs[flag], None, to)
                    except BaseException as e:  # surfaced below
                        errs.append(e)

                ts = [threading.Thread(target=work, args=(dev, flag)) for flag, dev in zip(sorted(xs), clones, strict=True)]
                [t.start() for t in ts]
                [t.join() for t in ts]
                if errs:
                    raise errs[0]
                outs.append(torch.cat([res[f] for f in sorted(xs)]))

        def call(j):
            if j == len(wrappers):
                return steps()
            guider = types.SimpleNamespace(model_patcher=self)
            return wrappers[j](_Exec(guider, lambda: call(j + 1)))

        call(0)
        return outs


class _Exec:
    def __init__(self, class_obj, nxt):
        self.class_obj = class_obj
        self._next = nxt

    def __call__(self, *a, **k):
        return self._next()


def tiny_sae(seed=0, M=32):
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=C, n_latents=M, k=4, activation="topk_relu", hook_point="up_blocks.1.attentions.1",
                    model_family="sd1")
    return SparseAutoencoder(cfg, W_enc=torch.randn(M, C, generator=g), b_enc=torch.zeros(M),
                             W_dec=torch.randn(M, C, generator=g), b_dec=torch.zeros(C), source="tiny.safetensors")


PER = ReplaceSettings(mode="random", seed=3)


def patched(base, edit=PER):
    sae = tiny_sae()
    concept = ConceptDictionary.from_latents([1, 5, 9], 32, threshold=0.0, name="t", sae_fingerprint=sae.fingerprint())
    det = ConceptDetector([(concept, None)], DetectionSettings(threshold_scale=1.0, padding=0), sae=sae)
    rec = Recorder()
    state = hook.RunState("Patch Replacer t", rec)
    iv = BlockIntervention(sae, det, edit, branches="both", recorder=rec, label="t")
    return hook.install_patch(base, KEY, iv, state, "outer_sample"), state


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {0: torch.randn(2, C, 3, 5, generator=g), 1: torch.randn(2, C, 3, 5, generator=g)}


SIGMAS = torch.tensor([9.0, 6.0, 3.0, 1.0, 0.0])


def masks_of(rec):
    return {(b, i): rec.masks(branch=b, image=i) for b in ("cond", "uncond") for i in (0, 1)}


def test_clone_variants_keep_state_and_rebind_only_new_module_trees():
    base = NewPatcher(make_model())
    m, state = patched(base)
    fwd = m.object_patches[KEY + ".forward"]
    # plain clone, disable_dynamic (on a non-dynamic patcher): same modules, the very same patch
    for c in (m.clone(), m.clone(disable_dynamic=True)):
        assert c.object_patches[KEY + ".forward"] is fwd
        assert list(c.model_options["transformer_options"][hook.OPTIONS_KEY].values()) == [state]
    # force_deepcopy / model_override: a new module tree; the patch now runs that tree's block
    for c in (m.clone(force_deepcopy=True), m.deepclone_multigpu("cuda:1")):
        new = c.object_patches[KEY + ".forward"]
        assert new is not fwd and new.sae_state is state
        assert new.sae_prev.__self__ is get_attr(c.model, KEY)
        assert fwd.sae_prev.__self__ is get_attr(m.model, KEY)  # the original is untouched
    assert not base.object_patches and not base.callbacks  # the input model is untouched


@pytest.mark.parametrize("edit", [PER, None])
def test_multigpu_threads_merge_masks_and_match_one_device(edit):
    base = NewPatcher(make_model())
    m, state = patched(base, edit)
    xs = inputs()
    ref_out = m.sample(xs, SIGMAS, None)
    ref = masks_of(state.recorder)
    ref_n = len(state.recorder.records)
    clones = {DEVICES[0]: m.clone(), DEVICES[1]: m.deepclone_multigpu(DEVICES[1])}
    blocks = {d: get_attr(c.model, KEY) for d, c in clones.items()}
    for b in blocks.values():
        b.seen.clear()
    for run in range(12):  # repeated runs: no race, no stale records
        out = m.sample(xs, SIGMAS, clones)
        for a, b in zip(out, ref_out, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        got = masks_of(state.recorder)
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k][0] == ref[k][0]
            assert torch.equal(got[k][1], ref[k][1]), (run, k)
        assert len(state.recorder.records) == ref_n
        assert state.recorder.devices() == ["cpu"]  # the tensors' device (simulated devices share the CPU)
        assert sorted(state.hits) == sorted(DEVICES) and state.active == 0 and not state.warnings
    # each device thread ran its own clone's block, never the other one's
    assert set(blocks[DEVICES[0]].seen) == {DEVICES[0]} and set(blocks[DEVICES[1]].seen) == {DEVICES[1]}
    assert state.runs == 13


def test_records_of_two_device_threads_are_tagged_and_united():
    rec = Recorder()
    from sae_core.intervention import StepInfo

    barrier = threading.Barrier(2)

    def add(dev, flag, mask):
        barrier.wait()
        for s in range(50):
            step = StepInfo(timestep=float(s), sigma=1.0, chunks=(flag,), step_index=s)
            rec.add("b", step, flag, 0, mask[None], None, torch.tensor([False]), dev)

    a = torch.zeros(3, 4, dtype=torch.bool)
    a[0, 1] = True
    b = torch.zeros(3, 4, dtype=torch.bool)
    b[2, 3] = True
    ts = [threading.Thread(target=add, args=("cuda:0", 0, a)), threading.Thread(target=add, args=("cuda:1", 0, b))]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert len(rec.records) == 100 and rec.devices() == ["cuda:0", "cuda:1"]
    keys, m = rec.masks("cond", 0)
    assert keys == list(range(50)) and torch.equal(m, (a | b).expand(50, 3, 4))


def test_sae_weights_cast_once_per_device_and_dtype_under_threads():
    sae = tiny_sae()
    got = {}

    def cast(dtype):
        for _ in range(20):
            got.setdefault(dtype, set()).add(id(sae.weights("cpu", dtype).W_enc))

    ts = [threading.Thread(target=cast, args=(dt,)) for dt in (torch.float16, torch.bfloat16, torch.float64)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert all(len(v) == 1 for v in got.values())  # one cached cast per (device, dtype)
    for dt in got:
        torch.testing.assert_close(sae.weights("cpu", dt).W_enc, sae.W_enc.to(dt), rtol=0, atol=0)


def test_run_that_never_reaches_the_patch_warns_in_log_and_ui(caplog):
    base = NewPatcher(make_model())
    m, state = patched(base)
    shown = []
    state.notify = shown.append
    later = m.clone()
    later.add_object_patch(KEY + ".forward", lambda x, context=None, transformer_options={}: x)  # no chaining  # noqa: B006
    with caplog.at_level("WARNING"):
        later.sample(inputs(), SIGMAS, None)
    assert not state.recorder.records and len(shown) == 1 and KEY in shown[0]
    assert "never called the SAE patch" in caplog.text and state.warnings == shown
    # a run that reaches the patch clears the warning
    m.sample(inputs(), SIGMAS, None)
    assert state.recorder.records and not state.warnings and len(shown) == 1
