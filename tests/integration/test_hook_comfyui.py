"""The hook glue inside ComfyUI's real sampler on tiny SD1/SDXL UNets, with trivial interventions written here."""

import copy

import comfy.model_management
import comfy.patcher_extension
import pytest
import torch
from tiny_unets import sample

OUTER = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE


def _hook(pack):
    return pack.nodes.hook


class Log:
    """Records (block_in, block_out, step) and applies ``fn`` to the output."""

    def __init__(self, fn=None):
        self.calls = []
        self.fn = fn

    def __call__(self, block_in, block_out, step):
        self.calls.append((block_in.shape, block_out.shape, step))
        return block_out if self.fn is None else self.fn(block_in, block_out, step)


def _install(pack, tiny, block, intervention, label="t", window_of=None):
    hook = _hook(pack)
    state = hook.RunState(label, pack.sae_core.intervention.Recorder())
    m = hook.install_patch(tiny.model, "diffusion_model." + block, intervention, state, OUTER, window_of)
    return m, state


@pytest.fixture(params=["sd1", "sdxl"])
def tiny(request, sd1, sdxl):
    return {"sd1": sd1, "sdxl": sdxl}[request.param]


def test_identity_patch_reproduces_unpatched_latents_and_leaves_model_alone(pack, tiny):
    base = sample(tiny.model, tiny.family)
    log = Log()
    m, state = _install(pack, tiny, "output_blocks.4.1", log)
    assert m is not tiny.model and not tiny.model.object_patches
    out = sample(m, tiny.family)
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    assert log.calls and state.active == 0 and state.runs == 1
    torch.testing.assert_close(sample(tiny.model, tiny.family), base, rtol=0, atol=0)


@pytest.mark.parametrize("cfg,expect_chunks", [(4.0, 2), (1.0, 1)])
def test_step_info_from_transformer_options(pack, sd1, cfg, expect_chunks):
    steps = 3
    log = Log()
    m, _ = _install(pack, sd1, "output_blocks.4.1", log)
    sample(m, "sd1", width=128, height=96, batch=2, steps=steps, cfg=cfg)
    ms = sd1.model.get_model_object("model_sampling")
    import comfy.samplers

    schedule = comfy.samplers.calculate_sigmas(ms, "normal", steps)
    assert [c[2].step_index for c in log.calls] == list(range(steps))
    for (in_shape, out_shape, step), k in zip(log.calls, range(steps), strict=True):
        # non-square map, H and W from the tensor: 96x128 image -> latent 12x16 -> level-2 grid 3x4
        assert tuple(out_shape) == (2 * expect_chunks, 128, 3, 4) and in_shape == out_shape
        assert len(step.chunks) == expect_chunks and sorted(step.chunks) == list(range(expect_chunks))
        assert step.sigma == pytest.approx(float(schedule[k]), rel=1e-6)
        assert step.timestep == float(ms.timestep(torch.tensor([step.sigma])))


def test_window_by_percent_to_sigma(pack, sd1):
    log = Log()
    ms = sd1.model.get_model_object("model_sampling")
    m, _ = _install(pack, sd1, "output_blocks.4.1", log, window_of=lambda ms_: pack.nodes.comfy_steps.sigma_window(ms_, 0.3, 0.8))
    sample(m, "sd1", steps=6, cfg=1.0)
    lo, hi = ms.percent_to_sigma(0.8), ms.percent_to_sigma(0.3)
    seen = [c[2].sigma for c in log.calls]
    import comfy.samplers

    schedule = [float(s) for s in comfy.samplers.calculate_sigmas(ms, "normal", 6)[:-1]]
    assert seen == [s for s in schedule if lo <= s <= hi] and 0 < len(seen) < 6


def test_two_chained_patches_both_run_in_order(pack, tiny):
    base = sample(tiny.model, tiny.family)
    order = []

    def double(bi, bo, st):
        order.append("double")
        return bo * 2

    def halve(bi, bo, st):
        order.append("halve")
        return bo * 0.5  # exact: powers of two

    m1, s1 = _install(pack, tiny, "output_blocks.4.1", Log(double))
    m2, s2 = _install(pack, type(tiny)(m1, tiny.family, tiny.widths), "output_blocks.4.1", Log(halve))
    out = sample(m2, tiny.family)
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    assert order[:2] == ["double", "halve"] and order.count("double") == order.count("halve")
    changed = sample(m1, tiny.family)  # the first patch alone really changes the result
    assert not torch.equal(changed, base)


def test_holder_survives_deep_copies_of_model_options(pack, sd1):
    m, state = _install(pack, sd1, "output_blocks.4.1", Log())
    c = m.clone().clone()
    held = list(c.model_options["transformer_options"][_hook(pack).OPTIONS_KEY].values())
    assert held == [state] and held[0] is state
    assert copy.deepcopy(state) is state


@pytest.mark.parametrize("exc", [RuntimeError("boom"), comfy.model_management.InterruptProcessingException()])
def test_error_or_interrupt_mid_run_leaves_nothing_active(pack, sd1, exc):
    base = sample(sd1.model, "sd1")

    def fail(bi, bo, st):
        if st.step_index == 1:
            raise exc
        return bo + 1.0

    m, state = _install(pack, sd1, "output_blocks.4.1", Log(fail))
    with pytest.raises(type(exc)):
        sample(m, "sd1")
    assert state.active == 0 and state.model_sampling is None
    torch.testing.assert_close(sample(sd1.model, "sd1"), base, rtol=0, atol=0)


def test_recorder_reset_per_run(pack, sd1):
    rec_calls = []

    def rec(bi, bo, st):
        rec_calls.append(st.step_index)
        return bo

    m, state = _install(pack, sd1, "output_blocks.4.1", Log(rec))
    state.recorder.records.append("stale")  # anything left from an earlier run
    sample(m, "sd1", steps=2)
    assert state.recorder.records == [] and state.runs == 1
    sample(m, "sd1", steps=2)
    assert state.runs == 2


def test_validation_names_file_block_expected_found(pack, sd1, sdxl):
    class Cfg:
        def __init__(self, d, fam, hp):
            self.d_in, self.model_family, self.hook_point = d, fam, hp

    class S:
        def __init__(self, d, fam="sd1", hp="up_blocks.1.attentions.1"):
            self.cfg, self.source = Cfg(d, fam, hp), "/models/sae/obj.safetensors"

    assert pack.nodes.resolve.resolve_hook(S(128), sd1.model) == ("diffusion_model.output_blocks.4.1", "up_blocks.1.attentions.1")
    with pytest.raises(ValueError) as e:
        pack.nodes.resolve.resolve_hook(S(1280), sd1.model)
    msg = str(e.value)
    for part in ("/models/sae/obj.safetensors", "up_blocks.1.attentions.1", "output_blocks.4.1", "128 channels", "d_in=1280"):
        assert part in msg
    with pytest.raises(ValueError, match=r"obj.safetensors: the SAE was trained on sd1 .* the model is sdxl"):
        pack.nodes.resolve.resolve_hook(S(128), sdxl.model)
    with pytest.raises(ValueError, match="records no hook point"):
        pack.nodes.resolve.resolve_hook(S(128, hp=None), sd1.model)
