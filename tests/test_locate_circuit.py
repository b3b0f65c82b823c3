"""Circuit: JSON round trip, refusal of malformed or foreign files, config, masking and plotting."""

import json
import sys

import pytest
import torch
from conftest import make_model
from peft import get_peft_model
from test_locate import calibration_batches

from headmap_peft import Circuit, HeadMapConfig, HeadMapLinear, locate_circuit, mask_heads


@pytest.fixture(scope="module")
def circuit():
    return locate_circuit(make_model("llama"), calibration_batches(), 2, layers=[1, 2], progress=False)


def test_save_load_round_trip(circuit, tmp_path):
    path = tmp_path / "circuit.json"
    circuit.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "headmap-peft circuit" and data["version"] == 1
    assert data["model"]["num_layers"] == 3 and data["model"]["num_heads"] == 4 and data["model"]["head_dim"] == 8
    assert data["settings"]["method"] == "exact" and data["settings"]["heads_per_layer"] == 2
    assert data["settings"]["layers"] == [1, 2] and len(data["settings"]["data_sha256"]) == 64
    assert data["scores"][0] == [None] * 4  # layer 0 was not searched
    loaded = Circuit.load(path, model=make_model("llama"))
    assert loaded.heads == circuit.heads and list(loaded.heads[1]) == circuit.heads[1]
    torch.testing.assert_close(loaded.scores, circuit.scores, rtol=0, atol=0, equal_nan=True)
    assert loaded.settings == circuit.settings and loaded.model == circuit.model
    assert not list(tmp_path.glob(".*tmp"))


def test_to_config_and_adapter(circuit):
    config = circuit.to_config(r=4, task_type="CAUSAL_LM")
    assert isinstance(config, HeadMapConfig) and config.target_heads == circuit.heads and config.r == 4
    model = get_peft_model(make_model("llama"), config)
    wrapped = [name for name, m in model.named_modules() if isinstance(m, HeadMapLinear)]
    assert len(wrapped) == 2 and all(".layers.1." in n or ".layers.2." in n for n in wrapped)
    with pytest.raises(TypeError, match="sets target_heads from the circuit"):
        circuit.to_config(target_heads={0: [1]})


def test_mask_heads_takes_a_circuit_and_checks_its_shape(circuit):
    model = make_model("llama")
    batch = calibration_batches()[0]
    with torch.no_grad():
        with mask_heads(model, circuit.heads):
            by_heads = model(**batch).logits
        with mask_heads(model, circuit):
            by_circuit = model(**batch).logits
        plain = model(**batch).logits
    torch.testing.assert_close(by_circuit, by_heads, rtol=0, atol=0)
    assert not torch.allclose(plain, by_heads)
    with pytest.raises(
        ValueError, match="3 layers x 4 heads of size 8, but the model has 3 layers x 4 heads of size 16"
    ):
        with mask_heads(make_model("gemma"), circuit):
            pass


def test_circuit_from_another_model_is_refused(circuit, tmp_path):
    path = tmp_path / "c.json"
    circuit.save(path)
    with pytest.raises(ValueError, match="but the model has 3 layers x 4 heads of size 16.*locate a circuit"):
        Circuit.load(path, model=make_model("gemma"))
    from transformers import LlamaConfig, LlamaForCausalLM

    deeper = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=5, num_attention_heads=4))
    with pytest.raises(ValueError, match="with 3 layers x 4 heads.*has 5 layers"):
        circuit.check_model(deeper)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a HeadMap circuit"),
        ('{"format": "something else"}', "not a HeadMap circuit"),
        (None, "version 99"),
        (None, "missing \\['scores'\\]"),
        (None, "scores have shape \\(2, 4\\)"),
        (None, "do not fit the recorded model shape"),
        (None, "num_heads must be a positive integer"),
        (None, "head index 'x'"),
    ],
)
def test_malformed_circuit_files_are_refused(circuit, tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is None:
        data = circuit.to_dict()
        if "version" in message:
            data["version"] = 99
        elif "missing" in message:
            del data["scores"]
        elif "scores have shape" in message:
            data["scores"] = data["scores"][:2]
        elif "do not fit" in message:
            data["heads"]["2"] = [7]
        elif "num_heads" in message:
            data["model"]["num_heads"] = "four"
        else:
            data["heads"]["1"] = ["x"]
        content = json.dumps(data)
    path.write_text(content)
    with pytest.raises((ValueError, TypeError), match=message):
        Circuit.load(path)


def test_plot_writes_a_png(circuit, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "heatmap.png"
    circuit.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(circuit, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        circuit.plot(tmp_path / "heatmap.png")
    assert not (tmp_path / "heatmap.png").exists()
