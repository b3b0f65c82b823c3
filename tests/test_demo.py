"""The embedded demo: deterministic corpus and tokenizer, the QA task split by person, the cached model."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer

from headmap_peft import demo
from headmap_peft.demo import (
    ATTRIBUTES,
    DemoConfig,
    accuracy,
    build_tokenizer,
    default_model_path,
    demo_info,
    finetune,
    is_cached,
    load_default_model,
    make_people,
    predictions,
    pretraining_sentences,
    targets,
    task_splits,
)
from headmap_peft.demo.corpus import fact_sentences

MICRO = DemoConfig.micro()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models gain nothing from more threads, and on busy shared CPUs waiting threads stall them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def micro_cache(one_thread, tmp_path_factory) -> str:
    """A cache root holding the micro demo model, built once for this module."""
    root = str(tmp_path_factory.mktemp("headmap_cache"))
    demo.build_default_model(root, MICRO, progress=False)
    return root


def test_corpus_is_deterministic():
    assert make_people(50, seed=3) == make_people(50, seed=3)
    assert pretraining_sentences(make_people(50)) == pretraining_sentences(make_people(50))
    assert make_people(50, seed=3) != make_people(50, seed=4)
    people = make_people(200)
    assert len({p.name for p in people}) == 200
    assert all(set(p.facts) == set(ATTRIBUTES) for p in people)


def test_held_out_phrasings_never_appear_in_pretraining():
    people = make_people(40)
    corpus = set(pretraining_sentences(people, world=False))
    held_out = {f"{prompt} {value} ." for _, _, prompt, value in fact_sentences(people, held_out=True)}
    assert len(held_out) == 40 * len(ATTRIBUTES)  # one held-out phrasing per fact
    assert not corpus & held_out
    # every fact is still stated in the other phrasings
    assert len(corpus) == sum(1 for _ in fact_sentences(people))


def test_tokenizer_is_deterministic_and_round_trips(tmp_path):
    tokenizer = build_tokenizer()
    assert tokenizer.get_vocab() == build_tokenizer().get_vocab()
    records = demo.question_records(make_people(30))
    texts = pretraining_sentences(make_people(30)) + [r["prompt"] + r["target"] for r in records]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(tokenizer.tokenize(text))
    # the corpus is written with spaces between words, so it decodes back exactly
    sentence = pretraining_sentences(make_people(1))[0]
    assert tokenizer.decode(tokenizer(sentence)["input_ids"], skip_special_tokens=True) == sentence
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(texts[0])["input_ids"] == tokenizer(texts[0])["input_ids"]
    assert (reloaded.pad_token, reloaded.bos_token, reloaded.eos_token, reloaded.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )


def test_every_target_is_one_token():
    tokenizer = build_tokenizer()
    splits = task_splits(config=MICRO)
    assert {len(t) for t in targets(tokenizer, list(splits["train"]))} == {1}


def test_task_split_is_disjoint_by_person_and_seeded():
    splits = task_splits(seed=0)
    train_people, eval_people = set(splits["train"]["person"]), set(splits["eval"]["person"])
    assert not train_people & eval_people
    assert len(train_people | eval_people) == DemoConfig().num_people
    assert len(splits["eval"]) == len(eval_people) * len(ATTRIBUTES)
    assert {"prompt", "target"} <= set(splits["train"].column_names)
    assert task_splits(seed=0)["eval"]["prompt"] == splits["eval"]["prompt"]
    assert set(task_splits(seed=1)["eval"]["person"]) != eval_people
    # the question format never appears in pretraining about a person
    corpus = " ".join(pretraining_sentences(make_people(DemoConfig().num_people)))
    assert "Where does" not in corpus and splits["eval"][0]["prompt"].startswith("Q: ")
    with pytest.raises(ValueError, match="eval_fraction"):
        task_splits(eval_fraction=1.0)


def test_cache_path_honours_env_and_config(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADMAP_CACHE", str(tmp_path))
    path = default_model_path()
    assert path.parent == tmp_path and path.name.startswith("demo-")
    assert default_model_path(config=MICRO) != path  # another config, another directory
    assert default_model_path(tmp_path / "other").parent == tmp_path / "other"
    monkeypatch.delenv("HEADMAP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_path().parent == tmp_path / "xdg" / "headmap_peft"


def test_second_load_reuses_the_cache(monkeypatch, micro_cache):
    monkeypatch.setenv("HEADMAP_CACHE", micro_cache)
    assert is_cached(config=MICRO)
    info = demo_info(default_model_path(config=MICRO))
    assert info["config"] == MICRO.to_dict()

    def no_pretraining(*args, **kwargs):
        raise AssertionError("the cached model was pretrained again")

    monkeypatch.setattr(demo.cache, "pretrain", no_pretraining)
    first, tokenizer = load_default_model(config=MICRO, progress=False)
    second, _ = load_default_model(config=MICRO, progress=False)
    assert not first.training
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert [p.name for p in default_model_path(config=MICRO).parent.iterdir() if p.name.startswith(".")] == []


def test_build_is_deterministic_and_atomic(monkeypatch, tmp_path, micro_cache):
    # a rebuild elsewhere gives the same weights
    demo.build_default_model(tmp_path / "again", MICRO, progress=False)
    a, _ = load_default_model(tmp_path / "again", progress=False, config=MICRO)
    b, _ = load_default_model(micro_cache, progress=False, config=MICRO)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    # a build that fails at the last step leaves neither a model nor a temporary directory behind
    def failing_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(demo.cache.os, "rename", failing_rename)
    root = tmp_path / "broken"
    with pytest.raises(OSError, match="disk full"):
        demo.build_default_model(root, MICRO, progress=False)
    assert not is_cached(root, MICRO)
    assert os.listdir(root) == []

    # a directory in the way that is not a complete model is reported, not silently used or overwritten
    default_model_path(root, MICRO).mkdir()
    with pytest.raises(FileExistsError, match="delete it"):
        load_default_model(root, progress=False, config=MICRO)


def test_predictions_match_greedy_decoding(micro_cache):
    model, tokenizer = load_default_model(micro_cache, progress=False, config=MICRO)
    records = list(task_splits(config=MICRO)["eval"])[:12]
    predicted = predictions(model, tokenizer, records)
    for record, tokens in zip(records, predicted):
        prompt = tokenizer(record["prompt"], return_tensors="pt")
        generated = model.generate(**prompt, max_new_tokens=len(tokens), do_sample=False, pad_token_id=0)
        assert tuple(generated[0, prompt["input_ids"].shape[1] :].tolist()) == tokens


def test_finetune_learns_the_train_questions(micro_cache):
    model, tokenizer = load_default_model(micro_cache, progress=False, config=MICRO)
    records = list(task_splits(config=MICRO)["train"])[:8]
    before = accuracy(model, tokenizer, records)
    losses = finetune(model, tokenizer, records, steps=60, batch_size=8, lr=1e-2, progress=False)
    assert losses[-1] < losses[0] / 4
    assert accuracy(model, tokenizer, records) == 1.0 > before
    assert not model.training
