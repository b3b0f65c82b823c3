"""Checkpoints: written atomically after each layer, resumed to the identical circuit, refused when settings differ."""

import json

import pytest
from conftest import make_model
from test_locate import assert_same_circuit, calibration_batches

import headmap_peft.locate.search as search
from headmap_peft import locate_circuit
from headmap_peft.locate.engine import PrefixCache


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, layers_written: int):
    """Make the run stop (like a KeyboardInterrupt or a killed job) right after the checkpoint of that many layers."""
    real = search._write_checkpoint

    def write_then_stop(path, settings, done):
        real(path, settings, done)
        if len(done) == layers_written:
            raise Interrupted

    monkeypatch.setattr(search, "_write_checkpoint", write_then_stop)


def count_evaluated_layers(monkeypatch) -> list[int]:
    evaluated = []
    real = PrefixCache.exact_layer

    def spy(self, layer, candidates, advance=lambda n: None):
        evaluated.append(layer)
        return real(self, layer, candidates, advance)

    monkeypatch.setattr(PrefixCache, "exact_layer", spy)
    return evaluated


@pytest.mark.parametrize("method", ["exact", "naive", "shortlist"])
def test_resume_after_interruption_gives_the_identical_circuit(tmp_path, monkeypatch, method):
    model = make_model("qwen2", seed=4)
    batches = calibration_batches(seed=5)
    options = dict(heads_per_layer=2, method=method, progress=False)
    if method == "shortlist":
        options["shortlist"] = 3
    uninterrupted = locate_circuit(model, batches, **options)

    path = tmp_path / "locate.json"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        with pytest.raises(Interrupted):
            locate_circuit(model, batches, checkpoint=path, **options)
    saved = json.loads(path.read_text())
    assert sorted(saved["layers"]) == ["0", "1"]
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temporary file left

    with monkeypatch.context() as patch:
        evaluated = count_evaluated_layers(patch)
        resumed = locate_circuit(model, batches, checkpoint=path, **options)
    assert_same_circuit(resumed, uninterrupted, tol=0)
    if method != "naive":
        assert evaluated == [2]  # layers 0 and 1 came from the checkpoint
    assert sorted(json.loads(path.read_text())["layers"]) == ["0", "1", "2"]

    with monkeypatch.context() as patch:  # a finished checkpoint returns the circuit without any evaluation
        evaluated = count_evaluated_layers(patch)
        again = locate_circuit(model, batches, checkpoint=path, **options)
    assert evaluated == [] and again.heads == uninterrupted.heads


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    model = make_model("llama")
    batches = calibration_batches()
    path = tmp_path / "locate.json"
    locate_circuit(model, batches, 2, layers=[0, 1], checkpoint=path, progress=False)
    before = path.read_text()
    with pytest.raises(ValueError, match="heads_per_layer: checkpoint 2 vs now 3"):
        locate_circuit(model, batches, 3, layers=[0, 1], checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="data_sha256"):
        locate_circuit(model, calibration_batches(seed=9), 2, layers=[0, 1], checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="method: checkpoint 'exact' vs now 'naive'"):
        locate_circuit(model, batches, 2, layers=[0, 1], method="naive", checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="model_head_dim"):
        locate_circuit(make_model("gemma"), batches, 2, layers=[0, 1], checkpoint=path, progress=False)
    assert path.read_text() == before
    # results do not depend on the memory budget, so it may change between runs
    locate_circuit(model, batches, 2, layers=[0, 1], checkpoint=path, max_rows_per_pass=2, progress=False)


def test_damaged_checkpoint_is_refused(tmp_path):
    path = tmp_path / "locate.json"
    for content, message in [("{", "cannot be read"), ('{"format": "x"}', "not a locate_circuit checkpoint")]:
        path.write_text(content)
        with pytest.raises(ValueError, match=message):
            locate_circuit(make_model("llama"), calibration_batches(), 2, checkpoint=path, progress=False)


def test_progress_bar_reports_layers(capsys):
    locate_circuit(make_model("llama"), calibration_batches(), 2, progress=True)
    err = capsys.readouterr().err
    assert "locating heads (exact)" in err and "layer 2" in err and "eval" in err
    locate_circuit(make_model("llama"), calibration_batches(), 2, progress=False)
    assert "locating heads" not in capsys.readouterr().err
