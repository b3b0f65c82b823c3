"""The `headmap` command line: locate, ablate and plot on a tiny saved model and word-level tokenizer."""

import json

import pytest
import torch
from conftest import make_model
from test_locate import word_tokenizer  # noqa: F401  (fixture)

from headmap_peft import Circuit, locate_circuit, select_calibration_samples
from headmap_peft.cli import main


@pytest.fixture
def saved(tmp_path, word_tokenizer):  # noqa: F811
    tokenizer, records = word_tokenizer
    model = make_model("llama")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["target"]}) + "\n" for r in records))
    return tmp_path, model, tokenizer, records


def test_locate_writes_the_circuit_of_the_python_api(saved, capsys):
    tmp_path, model, tokenizer, records = saved
    out = tmp_path / "circuit.json"
    status = main(
        [
            "locate",
            "--model", str(tmp_path / "model"),
            "--data", str(tmp_path / "train.jsonl"),
            "--prompt-field", "question",
            "--target-field", "answer",
            "--samples", "6",
            "--heads-per-layer", "2",
            "--batch-size", "4",
            "--output", str(out),
            "--plot", str(tmp_path / "heatmap.png"),
            "--no-progress",
        ]
    )  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert f"6 heads in 3 layers, written to {out}" in printed and "layer 0: [" in printed
    circuit = Circuit.load(out, model=model)
    chosen = select_calibration_samples(model, tokenizer, records, n=6, batch_size=4, progress=False)
    expected = locate_circuit(model, chosen, 2, tokenizer=tokenizer, batch_size=4, progress=False)
    assert circuit.heads == expected.heads
    torch.testing.assert_close(circuit.scores, expected.scores)
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_ablate_prints_a_markdown_table_and_plot_writes_a_png(saved, capsys):
    tmp_path, model, tokenizer, records = saved
    data = tmp_path / "test.csv"
    data.write_text("prompt,target\n" + "".join(f"{r['prompt']},{r['target']}\n" for r in records))
    circuit = locate_circuit(model, records, 1, tokenizer=tokenizer, progress=False)
    circuit.save(tmp_path / "circuit.json")
    common = ["--model", str(tmp_path / "model"), "--data", str(data), "--circuit", str(tmp_path / "circuit.json")]
    assert main(["ablate", *common, "--draws", "2", "--samples", "8", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("8 samples")
    table = lines[lines.index("| condition | heads masked | loss | exact match |") :]
    assert [line.split("|")[1].strip() for line in table[2:]] == [
        "no heads masked",
        "circuit masked",
        "random heads masked (2 draws)",
    ]
    assert all(line.split("|")[2].strip() == "3" for line in table[3:])
    assert main(["plot", "--circuit", str(tmp_path / "circuit.json"), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_clear_error_and_no_output(saved, capsys):
    tmp_path, model, tokenizer, records = saved
    out = tmp_path / "circuit.json"
    base = ["locate", "--model", str(tmp_path / "model"), "--output", str(out), "--no-progress"]
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "data.txt").write_text("x")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    cases = [
        (["--data", str(tmp_path / "train.jsonl")], "no field(s) ['prompt', 'target']"),
        (["--data", str(tmp_path / "data.txt")], "unknown file type '.txt'"),
        (["--data", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--data", str(tmp_path / "empty.jsonl")], "holds no records"),
        (["--data", str(tmp_path / "broken.jsonl")], "cannot be read as json: ArrowInvalid: JSON parse error"),
        (["--data", str(tmp_path / "train.jsonl"), "--prompt-field", "question", "--target-field", "answer",
          "--heads-per-layer", "9"], "heads_per_layer=9 but the model has 4 heads per layer"),
        (["--data", str(tmp_path / "train.jsonl"), "--prompt-field", "question", "--target-field", "answer",
          "--heads-per-layer", "2", "--layers", "2-5"], "layer 3 but the model has 3 layers"),
        (["--data", str(tmp_path / "train.jsonl"), "--samples", "0"], "--samples must be >= 1, got 0"),
    ]  # fmt: skip
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()[-1]  # datasets may log above it
        assert err.startswith("headmap locate: error: ") and message in err, err
        assert not out.exists()
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    data = ["--data", str(tmp_path / "train.jsonl"), "--prompt-field", "question", "--target-field", "answer"]
    ablate = ["ablate", "--model", str(tmp_path / "model"), *data, "--no-progress"]
    assert main([*ablate, "--circuit", str(tmp_path / "bad.json")]) == 2
    assert "not a HeadMap circuit" in capsys.readouterr().err
    assert main(["plot", "--circuit", str(tmp_path / "nope.json"), "--output", str(tmp_path / "x.png")]) == 2
    assert "nope.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["locate", "--model", "m"])  # argparse: missing required options
