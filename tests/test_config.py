"""HeadMapConfig: validation, JSON round trip and PEFT registration."""

import json

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import headmap_peft
from headmap_peft import HeadMapConfig, HeadMapModel


def test_import_registers_headmap_with_peft_idempotently():
    headmap_peft.register()
    headmap_peft.register()
    assert PeftType.HEADMAP == "HEADMAP"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HEADMAP] is HeadMapConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HEADMAP] is HeadMapModel


def test_defaults():
    config = HeadMapConfig(target_heads={3: [0, 5]})
    assert config.peft_type == PeftType.HEADMAP
    assert (config.r, config.scaling, config.bias, config.placement) == (8, 1.0, "auto", "attention_output")
    assert config.init_weights is True
    assert config.num_selected_heads == 2


def test_json_round_trip_restores_int_layer_keys(tmp_path):
    config = HeadMapConfig(target_heads={4: [2, 7], 3: [5, 0]}, r=4, scaling=0.5, task_type="CAUSAL_LM")
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "HEADMAP"
    assert raw["target_heads"] == {"3": [5, 0], "4": [2, 7]}  # JSON keys are strings
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, HeadMapConfig)
    # int keys, layers sorted, heads kept in the order given (selection order)
    assert loaded.target_heads == {3: [5, 0], 4: [2, 7]}
    assert list(loaded.target_heads) == [3, 4]
    assert (loaded.r, loaded.scaling, loaded.task_type) == (4, 0.5, "CAUSAL_LM")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"target_heads": {}}, ValueError, "target_heads is empty"),
        ({}, ValueError, "needs target_heads"),
        ({"target_heads": {1: [2, 2]}}, ValueError, r"lists head\(s\) \[2\] more than once"),
        ({"target_heads": {1: []}}, ValueError, r"target_heads\[1\] is empty"),
        ({"target_heads": {1: [-1]}}, ValueError, "negative head index"),
        ({"target_heads": {-2: [1]}}, ValueError, "layer -2"),
        ({"target_heads": {"a": [1]}}, TypeError, "layer index 'a' must be an integer"),
        ({"target_heads": {1.5: [1]}}, TypeError, "must be an integer"),
        ({"target_heads": {1: [0.5]}}, TypeError, "head index 0.5 must be an integer"),
        ({"target_heads": {1: [True]}}, TypeError, "must be an integer"),
        ({"target_heads": {1: "01"}}, TypeError, "must be a list of head indices"),
        ({"target_heads": {1: [0], "1": [2]}}, ValueError, "names layer 1 twice"),
        ({"target_heads": [[0, 1]]}, TypeError, "must be a mapping"),
        ({"target_heads": {1: [0]}, "r": 0}, ValueError, "r must be an integer >= 1, got 0"),
        ({"target_heads": {1: [0]}, "r": 2.0}, ValueError, "r must be an integer"),
        ({"target_heads": {1: [0]}, "placement": "mlp"}, ValueError, "placement must be one of"),
        ({"target_heads": {1: [0]}, "bias": "lora_only"}, ValueError, "bias must be True, False or 'auto'"),
        ({"target_heads": {1: [0]}, "scaling": float("nan")}, ValueError, "scaling must be a finite number"),
        ({"target_heads": {1: [0]}, "num_attention_heads": 0}, ValueError, "num_attention_heads must be"),
        ({"target_heads": {1: [0]}, "attention_output_module": ""}, ValueError, "attention_output_module"),
    ],
)
def test_bad_config_is_refused_with_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        HeadMapConfig(**kwargs)


def test_lora_only_knobs_are_refused():
    with pytest.raises(TypeError, match="lora_alpha"):
        HeadMapConfig(target_heads={1: [0]}, lora_alpha=16)
    with pytest.raises(TypeError, match="target_modules"):
        HeadMapConfig(target_heads={1: [0]}, target_modules=["q_proj"])
