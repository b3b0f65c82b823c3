"""Smoke test of examples/quickstart.py and benchmarks/quality.py with tiny settings and a temporary model cache."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.py"


def _run(script: Path, *args: str, cache: Path) -> subprocess.CompletedProcess:
    # micro settings: one thread is enough, and on busy shared CPUs waiting OpenMP threads stall small models
    env = {**os.environ, "HEADMAP_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_quickstart_end_to_end(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "run"
    first = _run(QUICKSTART, "--quick", "--no-progress", "--output-dir", str(out), cache=cache)
    assert first.returncode == 0, first.stdout + first.stderr
    for step in range(1, 7):
        assert f"[{step}/6]" in first.stdout
    assert "first run: pretraining the demo model" in first.stdout
    assert "check reloaded == trained: OK" in first.stdout
    assert "check merged == trained: OK" in first.stdout
    assert "| circuit masked |" in first.stdout and "| random heads masked" in first.stdout
    assert "LoRA r=8 (q_proj, v_proj)" in first.stdout and "HeadMap r=8 (circuit" in first.stdout
    assert (out / "circuit.png").stat().st_size > 0
    assert (out / "headmap_adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "headmap_adapter" / "adapter_config.json").read_text())["peft_type"] == "HEADMAP"
    results = json.loads((out / "results.json").read_text())
    assert results["checks_passed"] is True
    assert results["trainable_parameters"]["headmap"] < results["trainable_parameters"]["lora"]
    assert str(out / "circuit.png") in first.stdout and str(out / "headmap_adapter") in first.stdout

    # the second run reuses the cached demo model
    second = _run(QUICKSTART, "--quick", "--no-progress", "--output-dir", str(out), cache=cache)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "first run" not in second.stdout
    assert len([p for p in cache.iterdir()]) == 1


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def quickstart_module(one_thread):
    spec = importlib.util.spec_from_file_location("quickstart_under_test", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_fails_when_the_reloaded_adapter_differs(quickstart_module, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HEADMAP_CACHE", str(tmp_path / "cache"))
    real = quickstart_module.PeftModel

    def corrupted_from_pretrained(model, path, **kwargs):
        loaded = real.from_pretrained(model, path, **kwargs)
        with torch.no_grad():
            for name, param in loaded.named_parameters():
                if "headmap_up" in name:
                    param.add_(torch.randn_like(param))
        return loaded

    monkeypatch.setattr(
        quickstart_module, "PeftModel", types.SimpleNamespace(from_pretrained=corrupted_from_pretrained)
    )
    code = quickstart_module.main(["--quick", "--no-progress", "--output-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 1
    assert "MISMATCH" in captured.out and "FAILED" in captured.err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["checks_passed"] is False


def test_quickstart_takes_any_local_model(quickstart_module, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from headmap_peft.demo import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    argv = ["--quick", "--no-progress", "--model", str(tmp_path / "gpt2"), "--output-dir", str(tmp_path / "run")]
    assert quickstart_module.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 layers x 4 heads" in out and "LoRA r=8 (PEFT default)" in out
    assert "check merged == trained: OK" in out and "fact recall" not in out


def test_quality_benchmark_prints_a_table(tmp_path):
    result = _run(ROOT / "benchmarks" / "quality.py", "--quick", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    for method in ("no fine-tuning", "LoRA (q_proj, v_proj)", "HeadMap, located circuit", "HeadMap, random heads"):
        assert f"| {method} |" in result.stdout
    assert "Machine:" in result.stdout and "CPUs" in result.stdout and "torch" in result.stdout
