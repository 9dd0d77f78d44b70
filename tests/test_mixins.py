"""The shared mixins: dict round trips give the dicts the hand-written methods gave, shared holders stay one object."""

import copy
import json

import pytest

from sae_core.config import SAEConfig
from sae_core.detect import DetectionSettings
from sae_core.errors import SAEConfigError
from sae_core.intervention import Recorder, ReplaceSettings
from sae_core.selection import SelectionRule
from sae_core.steer import SteerSettings
from shapes_world.evaluator import EvaluatorConfig
from shapes_world.model import ModelConfig
from shapes_world.text import TextEncoderConfig

# (object, the dict the former hand-written to_dict returned, written out by hand)
CASES = [
    (SelectionRule("top_n", top_n=3, fixed_threshold=0.5),
     {"method": "top_n", "percentile": 99.99, "top_n": 3, "fixed_threshold": 0.5, "max_ratio": 0.2, "min_rate": 0.002}),
    (DetectionSettings(2.0, 1, 3, True, "sticky"),
     {"threshold_scale": 2.0, "padding": 1, "min_region": 3, "gate": True, "temporal": "sticky", "min_share": 0.0}),
    (ReplaceSettings("mean", 4, "residual"), {"mode": "mean", "seed": 4, "target": "residual", "denoised": False,
                                              "fill_values": "first_pass", "keep_rest": "all", "hole": "object"}),
    (SteerSettings("unbox_add", -8.0, "legacy_saeuron", True),
     {"method": "unbox_add", "strength": -8.0, "error": "legacy_saeuron", "detected_only": True, "use_beta": False,
      "cfg_sign": "same"}),
    (SAEConfig(1280, 5120, 10, "topk_relu", "residual", "up_blocks.0.attentions.1", "sdxl", provenance={"a": [1]}),
     {"d_in": 1280, "n_latents": 5120, "k": 10, "activation": "topk_relu", "input_space": "residual",
      "hook_point": "up_blocks.0.attentions.1", "model_family": "sdxl", "apply_b_dec_to_input": True,
      "normalization": "none", "layer_norm_eps": 1e-5, "source_format": "native", "provenance": {"a": [1]}}),
    (TextEncoderConfig(dim=64, heads=2), {"vocab_size": 20, "max_length": 20, "dim": 64, "layers": 2, "heads": 2, "ff_mult": 2}),
    (EvaluatorConfig(16, 4), {"width": 16, "groups": 4}),
]


def _typed(d):
    """The dict with every value's type beside it, so 1 vs 1.0 or a tuple vs a list would differ."""
    if isinstance(d, dict):
        return {k: _typed(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return (type(d).__name__, [_typed(v) for v in d])
    return (type(d).__name__, d)


@pytest.mark.parametrize("obj, expected", CASES, ids=lambda c: type(c).__name__)
def test_to_dict_is_the_former_dict_and_round_trips(obj, expected):
    assert _typed(obj.to_dict()) == _typed(expected)
    assert list(obj.to_dict()) == list(expected)  # field order too: it is the order written to files
    if hasattr(type(obj), "from_dict"):
        assert type(obj).from_dict(json.loads(json.dumps(obj.to_dict()))) == obj


def test_model_config_lists_its_channels_like_json_does():
    cfg = ModelConfig(block_out_channels=(16, 32, 32))
    d = cfg.to_dict()
    assert d["block_out_channels"] == [16, 32, 32] and isinstance(d["block_out_channels"], list)
    assert _typed(d["text"]) == _typed(TextEncoderConfig().to_dict())
    # the training resume check compares a config read from JSON with a fresh one
    assert json.loads(json.dumps(d)) == d
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize("cls, error", [(SelectionRule, ValueError), (DetectionSettings, ValueError),
                                        (ReplaceSettings, ValueError), (SteerSettings, ValueError),
                                        (TextEncoderConfig, ValueError), (SAEConfig, SAEConfigError)])
def test_from_dict_names_unknown_keys(cls, error):
    with pytest.raises(error, match=rf"{cls.__name__}: unknown keys \['zz'\]; expected \["):
        cls.from_dict({"zz": 1})


def test_shared_holders_survive_deep_copies():
    rec = Recorder()
    options = {"transformer_options": {"x": rec}}
    cloned = copy.deepcopy(options)
    assert cloned["transformer_options"]["x"] is rec and copy.copy(rec) is rec
