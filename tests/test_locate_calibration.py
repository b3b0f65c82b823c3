"""Calibration samples (lowest loss of the unmodified model) and the ablation table."""

import math

import datasets
import pytest
import torch
from conftest import make_model
from test_locate import calibration_batches, word_tokenizer  # noqa: F401  (fixture)

from headmap_peft import locate_circuit, select_calibration_samples
from headmap_peft.data import prompt_target_batches
from headmap_peft.locate import ablation_table, format_ablation_table, random_heads, sample_losses


def loss_of(model, tokenizer, record):
    (batch,) = prompt_target_batches([record], tokenizer, batch_size=1)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_select_keeps_the_lowest_loss_samples(word_tokenizer):  # noqa: F811
    tokenizer, records = word_tokenizer
    model = make_model("llama")
    losses = [loss_of(model, tokenizer, r) for r in records]
    chosen = select_calibration_samples(model, tokenizer, records, n=4, batch_size=3, progress=False)
    expected = sorted(range(len(records)), key=lambda i: losses[i])[:4]
    assert chosen == [records[i] for i in expected]
    computed = sample_losses(model, tokenizer, records, batch_size=4, padding_side="left", progress=False)
    torch.testing.assert_close(computed, torch.tensor(losses, dtype=torch.float64), rtol=1e-5, atol=1e-6)

    dataset = datasets.Dataset.from_list(records)
    picked = select_calibration_samples(model, tokenizer, dataset, n=4, progress=False)
    assert isinstance(picked, datasets.Dataset) and picked.to_list() == chosen
    with pytest.warns(UserWarning, match="only 10 samples"):
        assert len(select_calibration_samples(model, tokenizer, records, n=50, progress=False)) == 10
    # the selection feeds locate_circuit directly
    circuit = locate_circuit(model, picked, 1, tokenizer=tokenizer, progress=False)
    assert circuit.settings["num_sequences"] == 4


def test_select_refuses_bad_input(word_tokenizer):  # noqa: F811
    tokenizer, records = word_tokenizer
    model = make_model("llama")
    with pytest.raises(ValueError, match="empty"):
        select_calibration_samples(model, tokenizer, [], n=2)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        select_calibration_samples(model, tokenizer, records, n=0)
    with pytest.raises(KeyError, match="set prompt_field/target_field"):
        select_calibration_samples(model, tokenizer, [{"question": "w1", "answer": "w2"}], n=1, progress=False)
    with pytest.raises(ValueError, match="has no tokens"):
        select_calibration_samples(model, tokenizer, [{"prompt": "w1", "target": ""}], n=1, progress=False)


def test_ablation_table_compares_circuit_and_random_heads():
    model = make_model("llama")
    batches = calibration_batches()
    circuit = locate_circuit(model, batches, 2, progress=False)
    rows = ablation_table(model, batches, circuit, draws=3, seed=1)
    assert [r.condition for r in rows] == ["no heads masked", "circuit masked", "random heads masked (3 draws)"]
    assert [r.heads_masked for r in rows] == [0, 6, 6]
    base, masked, random_rows = rows
    assert masked.loss > base.loss  # the greedy search maximises exactly this loss layer by layer
    assert all(0.0 <= r.accuracy <= 1.0 and math.isfinite(r.loss) for r in rows)
    assert random_rows.loss_std is not None and random_rows.draws == 3
    # the same numbers from a plain {layer: heads} mapping, and deterministic for a seed
    again = ablation_table(model, batches, circuit.heads, draws=3, seed=1)
    assert [(r.loss, r.accuracy, r.loss_std) for r in again] == [(r.loss, r.accuracy, r.loss_std) for r in rows]
    table = format_ablation_table(rows)
    assert table.splitlines()[0] == "| condition | heads masked | loss | exact match |"
    assert "| circuit masked | 6 |" in table and " ± " in table.splitlines()[-1]
    with pytest.raises(ValueError, match="heads of size 16"):
        ablation_table(make_model("gemma"), batches, circuit)
    with pytest.raises(ValueError, match="draws must be an integer >= 1"):
        ablation_table(model, batches, circuit, draws=0)


def test_random_heads_match_the_circuit_per_layer():
    import random

    drawn = random_heads({1: [3, 0], 2: [1]}, 4, random.Random(0))
    assert sorted(drawn) == [1, 2] and len(drawn[1]) == 2 and len(drawn[2]) == 1
    assert len(set(drawn[1])) == 2 and all(0 <= h < 4 for h in drawn[1] + drawn[2])


def test_exact_match_accuracy_is_greedy_prediction_of_the_target(word_tokenizer):  # noqa: F811
    from headmap_peft.locate import evaluate_masked

    tokenizer, records = word_tokenizer
    model = make_model("llama")
    batches = prompt_target_batches(records, tokenizer, batch_size=4)
    correct = 0
    for record in records:
        (batch,) = prompt_target_batches([record], tokenizer, batch_size=1)
        with torch.no_grad():
            logits = model(**batch).logits[0, :-1]
        labels = batch["labels"][0, 1:]
        correct += bool((logits.argmax(-1)[labels != -100] == labels[labels != -100]).all())
    loss, accuracy = evaluate_masked(model, batches)
    assert accuracy == correct / len(records)
    # one target token per record here, so the token-weighted mean is the mean over records
    assert math.isclose(loss, sum(loss_of(model, tokenizer, r) for r in records) / len(records), rel_tol=1e-5)
