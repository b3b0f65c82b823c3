"""locate_circuit: the exact engine returns the naive loop's circuit on every family, dtype, padding and base."""

import math

import pytest
import torch
from conftest import VOCAB, make_model

from headmap_peft import Circuit, locate_circuit, mask_heads
from headmap_peft.data import IGNORE_INDEX, pad_batch


def calibration_batches(padding_side="right", seed=0, sizes=(3, 2, 4)):
    """Padded prompt/target batches of uneven lengths, labels on the target only."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        features = []
        for _ in range(size):
            prompt = int(torch.randint(2, 7, (1,), generator=gen))
            target = int(torch.randint(1, 4, (1,), generator=gen))
            ids = torch.randint(3, VOCAB, (prompt + target,), generator=gen).tolist()
            features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
        batches.append(pad_batch(features, pad_token_id=0, padding_side=padding_side))
    return batches


def assert_same_circuit(fast: Circuit, reference: Circuit, tol: float = 1e-5):
    assert fast.heads == reference.heads
    torch.testing.assert_close(fast.scores, reference.scores, rtol=tol, atol=tol, equal_nan=True)


def test_exact_equals_naive_on_every_family(family):
    model = make_model(family)
    batches = calibration_batches()
    naive = locate_circuit(model, batches, heads_per_layer=2, method="naive", progress=False)
    exact = locate_circuit(model, batches, heads_per_layer=2, progress=False)
    assert_same_circuit(exact, naive)
    assert exact.scores.dtype == torch.float32 and exact.scores.shape == (3, 4)
    assert all(len(heads) == 2 for heads in exact.heads.values()) and sorted(exact.heads) == [0, 1, 2]
    for layer, heads in exact.heads.items():  # selection order: highest loss first
        assert exact.scores[layer, heads[0]] >= exact.scores[layer, heads[1]]
        others = [h for h in range(4) if h not in heads]
        assert exact.scores[layer, heads[1]] >= exact.scores[layer, others].max()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_exact_equals_naive_with_left_padding_layers_and_small_memory_budget(family):
    model = make_model(family, seed=1)
    batches = calibration_batches("left", seed=2)
    naive = locate_circuit(model, batches, 3, method="naive", layers=[1, 2], progress=False)
    for budget in (None, 1, 5):
        exact = locate_circuit(model, batches, 3, layers=[2, 1], max_rows_per_pass=budget, progress=False)
        assert_same_circuit(exact, naive)
    assert sorted(naive.heads) == [1, 2]
    assert torch.isnan(naive.scores[0]).all() and not torch.isnan(naive.scores[1:]).any()


def test_scores_are_the_masked_loss_given_earlier_picks():
    model = make_model("qwen2")
    batches = calibration_batches()
    circuit = locate_circuit(model, batches, 1, progress=False)
    # recompute one score by hand: layer 2, head 3, with the picks of layers 0 and 1 masked
    total, tokens = 0.0, 0
    with mask_heads(model, {0: circuit.heads[0], 1: circuit.heads[1], 2: [3]}), torch.no_grad():
        for batch in batches:
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += model(**batch).loss.item() * n  # transformers' loss is the mean over the batch's target tokens
            tokens += n
    assert math.isclose(circuit.scores[2, 3].item(), total / tokens, rel_tol=1e-5)


def test_ties_go_to_the_lower_head_index():
    model = make_model("llama")
    with torch.no_grad():  # heads 0..3 of layer 0 write nothing: masking any of them changes nothing
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    batches = calibration_batches()
    for method in ("naive", "exact"):
        circuit = locate_circuit(model, batches, 2, method=method, layers=[0], progress=False)
        assert circuit.heads == {0: [0, 1]}
        assert len(set(circuit.scores[0].tolist())) == 1


def test_model_is_left_as_it_was():
    model = make_model("gemma3")
    model.train()
    model.model.layers[1].eval()
    layers = list(model.model.layers)
    before = {n: p.clone() for n, p in model.named_parameters()}
    locate_circuit(model, calibration_batches(), 2, method="shortlist", shortlist=3, progress=False)
    assert list(model.model.layers) == layers
    assert model.training and not model.model.layers[1].training and model.model.layers[2].training
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_exact_equals_naive_with_float32_scores(dtype):
    model = make_model("llama").to(dtype)
    batches = calibration_batches()
    naive = locate_circuit(model, batches, 2, method="naive", progress=False)
    exact = locate_circuit(model, batches, 2, progress=False)
    assert exact.scores.dtype == torch.float32
    # half precision rounds differently in a batch of another size; the losses still agree closely
    torch.testing.assert_close(exact.scores, naive.scores, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(exact.scores).all()


def test_shortlist_and_attribution():
    model = make_model("mistral", seed=3)
    batches = calibration_batches()
    exact = locate_circuit(model, batches, 2, progress=False)
    full = locate_circuit(model, batches, 2, method="shortlist", shortlist=4, progress=False)
    assert_same_circuit(full, exact)  # a shortlist of every head is the exact search
    short = locate_circuit(model, batches, 2, method="shortlist", shortlist=3, progress=False)
    for layer, heads in short.heads.items():
        evaluated = (~torch.isnan(short.scores[layer])).nonzero().flatten().tolist()
        assert len(evaluated) == 3 and set(heads) <= set(evaluated)
    attribution = locate_circuit(model, batches, 2, method="attribution", progress=False)
    assert torch.isfinite(attribution.scores).all()
    # first-order estimates of small changes: close to the exact masked losses of the same prefix at layer 0
    torch.testing.assert_close(attribution.scores[0], exact.scores[0], rtol=0, atol=0.05)
    assert attribution.settings["method"] == "attribution"


def test_records_and_tokenised_samples_are_accepted(word_tokenizer):
    tokenizer, records = word_tokenizer
    model = make_model("llama")
    from_records = locate_circuit(model, records, 2, tokenizer=tokenizer, batch_size=3, progress=False)
    from headmap_peft.data import encode_prompt_target, prompt_target_batches

    batches = prompt_target_batches(records, tokenizer, batch_size=3)
    assert_same_circuit(locate_circuit(model, batches, 2, progress=False), from_records, tol=0)
    samples = [encode_prompt_target(tokenizer, r["prompt"], r["target"]) for r in records]
    from_samples = locate_circuit(model, samples, 2, tokenizer=tokenizer, batch_size=3, progress=False)
    assert_same_circuit(from_samples, from_records)
    import datasets

    dataset = datasets.Dataset.from_list(records)
    assert_same_circuit(
        locate_circuit(model, dataset, 2, tokenizer=tokenizer, batch_size=3, progress=False), from_records
    )


def test_8bit_base_exact_equals_naive(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), attn_implementation="eager"
    )
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "Linear8bitLt"
    batches = calibration_batches()
    naive = locate_circuit(model, batches, 2, method="naive", progress=False)
    exact = locate_circuit(model, batches, 2, progress=False)
    assert_same_circuit(exact, naive, tol=1e-4)
    attribution = locate_circuit(model, batches, 2, method="attribution", progress=False)
    assert torch.isfinite(attribution.scores).all()


def test_model_dispatched_with_accelerate_hooks():
    from accelerate import cpu_offload

    reference = locate_circuit(make_model("llama"), calibration_batches(), 2, method="naive", progress=False)
    model = cpu_offload(make_model("llama"), execution_device="cpu")  # weights on meta, loaded by hooks per module
    assert model.model.layers[0].self_attn.o_proj.weight.device.type == "meta"
    for method in ("exact", "naive"):
        assert_same_circuit(locate_circuit(model, calibration_batches(), 2, method=method, progress=False), reference)


def test_non_finite_losses_are_reported_not_ranked():
    model = make_model("llama")
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    for method in ("exact", "naive", "attribution"):
        with pytest.raises(FloatingPointError, match="layer 0 masked.*bfloat16"):
            locate_circuit(model, calibration_batches(), 2, method=method, progress=False)


# ---- bad input -----------------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_clearly(tmp_path):
    model = make_model("llama")
    batches = calibration_batches()
    checkpoint = tmp_path / "locate.json"
    cases = [
        (dict(samples_or_batches=[]), ValueError, "empty"),
        (dict(heads_per_layer=0), ValueError, "heads_per_layer must be an integer >= 1, got 0"),
        (dict(heads_per_layer=5), ValueError, "heads_per_layer=5 but the model has 4 heads per layer; use 1..4"),
        (dict(layers=[0, 3]), ValueError, r"layer 3 but the model has 3 layers \(0..2\)"),
        (dict(layers=[-1]), ValueError, "layer -1"),
        (dict(layers=[1, 1]), ValueError, "more than once"),
        (dict(method="beam"), ValueError, "method must be one of"),
        (dict(method="exact", shortlist=3), ValueError, "shortlist is an option of method='shortlist'"),
        (dict(method="shortlist", shortlist=1), ValueError, "shortlist=1 must lie between heads_per_layer=2"),
        (dict(max_rows_per_pass=0), ValueError, "max_rows_per_pass must be an integer >= 1"),
        (dict(samples_or_batches=[{"prompt": "a", "target": "b"}]), TypeError, "need a tokenizer"),
        (dict(samples_or_batches=[{"text": "a"}]), ValueError, r"keys \['text'\]"),
        (dict(samples_or_batches="data.jsonl"), TypeError, "must be an iterable of batches"),
    ]
    no_labels = {k: v for k, v in batches[0].items() if k != "labels"}
    cases.append((dict(samples_or_batches=[no_labels]), ValueError, "has no labels"))
    only_prompt = dict(batches[1], labels=torch.full_like(batches[1]["labels"], IGNORE_INDEX))
    cases.append((dict(samples_or_batches=[batches[0], only_prompt]), ValueError, r"\[1\] has no target token"))
    for kwargs, error, message in cases:
        arguments = dict(samples_or_batches=batches, heads_per_layer=2, progress=False, checkpoint=checkpoint)
        arguments.update(kwargs)
        with pytest.raises(error, match=message):
            locate_circuit(model, **arguments)
    assert not checkpoint.exists()  # no partial output


def test_unknown_architecture_points_to_the_override():
    model = make_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="attention_output_module='self_attn.o_proj', num_attention_heads=32"):
        locate_circuit(model, calibration_batches(), 2, progress=False)
    circuit = locate_circuit(
        model,
        calibration_batches(),
        2,
        attention_output_module="self_attn.o_proj",
        num_attention_heads=4,
        progress=False,
    )
    reference = locate_circuit(make_model("llama"), calibration_batches(), 2, progress=False)
    assert_same_circuit(circuit, reference)
    config = circuit.to_config(r=4)
    assert config.attention_output_module == "self_attn.o_proj" and config.num_attention_heads == 4


@pytest.fixture
def word_tokenizer():
    """A tiny word-level tokenizer and prompt/target records over its vocabulary."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(40)]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    records = [
        {"prompt": " ".join(f"w{(i * 7 + j) % 40}" for j in range(2 + i % 4)), "target": f"w{(i * 3) % 40}"}
        for i in range(10)
    ]
    return tokenizer, records


def test_out_of_memory_halves_the_pass_and_keeps_the_result(monkeypatch):
    from headmap_peft.locate import engine

    model = make_model("llama")
    batches = calibration_batches()
    reference = locate_circuit(model, batches, 2, progress=False)
    real = engine.PrefixCache._exact_batch
    budgets = []

    def small_memory(self, index, layer, candidates, budget):
        budgets.append(budget)
        if budget > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, index, layer, candidates, budget)

    monkeypatch.setattr(engine.PrefixCache, "_exact_batch", small_memory)
    with pytest.warns(UserWarning, match="out of memory") as caught:
        circuit = locate_circuit(model, batches, 2, max_rows_per_pass=16, progress=False)
    assert_same_circuit(circuit, reference)
    assert budgets[:3] == [16, 6, 3] and set(budgets[3:]) == {3}  # the first batch has 3 rows x 4 candidates
    assert len(caught) == 2  # later batches and layers start from the budget that fits
    assert "set max_rows_per_pass=3 to start there" in str(caught[-1].message)


def test_attention_block_is_replayed_only_where_it_ends_in_its_projection(monkeypatch):
    from headmap_peft.locate import engine

    calls = []
    real = engine._AttentionReplay.forward
    monkeypatch.setattr(
        engine._AttentionReplay, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    model = make_model("phi3")
    batches = calibration_batches()
    naive = locate_circuit(model, batches, 2, method="naive", progress=False)
    assert_same_circuit(locate_circuit(model, batches, 2, progress=False), naive)
    assert calls  # layer l's queries, keys and values were not recomputed per candidate

    calls.clear()  # a block that scales its projection's output (e.g. a hook someone added) is run for real
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda m, a, out: (out[0] * 1.5, *out[1:]))
    naive = locate_circuit(model, batches, 2, method="naive", progress=False)
    assert_same_circuit(locate_circuit(model, batches, 2, progress=False), naive)
    assert not calls
