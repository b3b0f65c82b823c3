"""Smoke tests of the training examples: each runs as a user would run it, on a tiny model, in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import two_process_launch
from test_trainers import tiny_llama, word_level_tokenizer

from headmap_peft import Circuit

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY = ["--max-steps", "3", "--batch-size", "4", "--calibration-samples", "8", "--no-progress"]
ENV = dict(
    os.environ,
    OMP_NUM_THREADS="1",
    TOKENIZERS_PARALLELISM="false",
    CUDA_VISIBLE_DEVICES="",
    HF_HUB_OFFLINE="1",
    PYTHONWARNINGS="ignore",
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama and a word-level tokenizer covering the demo task, saved like a hub checkpoint."""
    from headmap_peft.demo import task_splits

    splits = task_splits(seed=0)
    tokenizer = word_level_tokenizer(r["prompt"] + r["target"] for split in splits.values() for r in split)
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(tokenizer), hidden_size=64).save_pretrained(path)  # 4 heads of size 16, 2 layers
    tokenizer.save_pretrained(path)
    return path


def run(command: list[str], timeout: int = 240) -> str:
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def example(name: str, *args: str) -> str:
    return run([sys.executable, str(EXAMPLES / name), *args])


def table_row(output: str) -> list[str]:
    """The cells of the last row of the last markdown table in `output`."""
    rows = [line for line in output.splitlines() if line.startswith("|") and not line.startswith("|--")]
    return [cell.strip() for cell in rows[-1].strip("|").split("|")]


def saved_adapter(directory: Path) -> dict:
    assert (directory / "adapter_model.safetensors").is_file()
    return json.loads((directory / "adapter_config.json").read_text())


def test_train_trainer(tiny_model, tmp_path):
    out = example(
        "train_trainer.py",
        "--model",
        str(tiny_model),
        "--target-heads",
        '{"1": [0, 2]}',
        *TINY,
        "--output-dir",
        str(tmp_path),
    )
    before, after, reload_diff = table_row(out)
    assert float(reload_diff) == 0.0 and float(after) != float(before)
    config = saved_adapter(tmp_path / "adapter")
    assert config["peft_type"] == "HEADMAP" and config["target_heads"] == {"1": [0, 2]}
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "- headmap" in card and "## HeadMap circuit" in card and f"base_model: {tiny_model}" in card


def test_train_trl_sft_locates_a_circuit_by_default(tiny_model, tmp_path):
    out = example("train_trl_sft.py", "--model", str(tiny_model), *TINY, "--output-dir", str(tmp_path))
    located = re.search(r"located circuit \(\d+ heads on 8 samples\): (\{.*\})", out)
    assert located, out
    assert "all HeadMap maps" in out
    _, _, changed = table_row(out)
    moved, total = map(int, changed.split(" of "))
    assert moved == total == 4  # the down and up maps of both layers
    config = saved_adapter(tmp_path / "adapter")
    assert config["peft_type"] == "HEADMAP" and all(len(h) == 2 for h in config["target_heads"].values())


def test_train_accelerate_two_processes_end_with_the_same_adapter(tiny_model, tmp_path):
    # `accelerate launch --cpu` starts a single process without MPI; the torchrun launcher starts 2 CPU processes
    out = run(
        [
            *two_process_launch(EXAMPLES / "train_accelerate.py"),
            "--model",
            str(tiny_model),
            "--target-heads",
            '{"0": [3], "1": [1]}',
            *TINY,
            "--expect-processes",
            "2",
            "--output-dir",
            str(tmp_path),
        ]
    )
    digests = dict(re.findall(r"rank (\d): adapter sha256 ([0-9a-f]{64})", out))
    assert sorted(digests) == ["0", "1"], out
    assert digests["0"] == digests["1"]
    processes, before, after, identical = table_row(out)
    assert processes == "2" and identical == "yes" and float(after) != float(before)
    assert saved_adapter(tmp_path / "adapter")["target_heads"] == {"0": [3], "1": [1]}


def test_train_8bit_with_a_circuit_file(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    circuit = Circuit(
        heads={1: [2, 0]}, scores=torch.zeros(2, 4), model={"num_layers": 2, "num_heads": 4, "head_dim": 16}
    )
    circuit.save(tmp_path / "circuit.json")
    out = example(
        "train_8bit.py",
        "--model",
        str(tiny_model),
        "--circuit",
        str(tmp_path / "circuit.json"),
        *TINY,
        "--output-dir",
        str(tmp_path / "run"),
    )
    assert "circuit from" in out and "{1: [2, 0]}" in out
    *numbers, agreement = table_row(out)
    before, after, reload_diff, merge_diff, adapter_effect = map(float, numbers)
    assert agreement.endswith("%")
    assert reload_diff == 0.0 and after != before
    # merging requantises the projection: close to the unmerged model, far closer than the base model is
    assert merge_diff < 0.25 * adapter_effect
    assert saved_adapter(tmp_path / "run" / "adapter")["target_heads"] == {"1": [2, 0]}
