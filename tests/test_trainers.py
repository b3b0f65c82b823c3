"""HeadMap adapters under the usual trainers: transformers.Trainer, TRL's SFTTrainer, gradient checkpointing."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

import headmap_peft
from headmap_peft import HeadMapConfig
from headmap_peft.data import PromptTargetCollator, encode_prompt_target

TARGET = {0: [1, 3], 1: [0]}
SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def word_level_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over the words of `texts` (whitespace/punctuation split), adding ``<s>`` in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in splitter.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate([*SPECIALS.values(), *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk_token"]))
    backend.pre_tokenizer = splitter
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="right", **SPECIALS)


def tiny_llama(vocab_size: int, hidden_size: int = 32, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised 2-layer, 4-head Llama."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


RECORDS = [
    {"prompt": f"Q: Where does {first} {last} live? A:", "target": f" {city}"}
    for first, last, city in [
        ("Ada", "Byron", "London"),
        ("Alan", "Turing", "Manchester"),
        ("Emmy", "Noether", "Erlangen"),
        ("Kurt", "Goedel", "Vienna"),
        ("Marie", "Curie", "Paris"),
        ("Niels", "Bohr", "Copenhagen"),
        ("Lise", "Meitner", "Berlin"),
        ("Enrico", "Fermi", "Rome"),
    ]
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_level_tokenizer(r["prompt"] + r["target"] for r in RECORDS)


def headmap_model(tokenizer, seed: int = 0) -> PeftModel:
    model = tiny_llama(len(tokenizer), seed=seed)
    return get_peft_model(model, HeadMapConfig(target_heads=TARGET, r=4, task_type="CAUSAL_LM"))


def encoded_dataset(tokenizer):
    from datasets import Dataset

    return Dataset.from_list(RECORDS).map(
        lambda r: encode_prompt_target(tokenizer, r["prompt"], r["target"]), remove_columns=["prompt", "target"]
    )


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def is_headmap(name: str) -> bool:
    return ".headmap_down." in name or ".headmap_up." in name


def check_trained_only_headmap(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = snapshot(model)
    assert before.keys() == after.keys()
    changed = {name for name in after if not torch.equal(before[name], after[name])}
    headmap = {name for name in after if is_headmap(name)}
    assert headmap and changed == headmap, (
        f"changed {sorted(changed - headmap)[:3]}, unchanged headmap {headmap - changed}"
    )


def training_args(tmp_path: Path, steps: int = 3, **kwargs) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        **kwargs,
    )


def test_trainer_trains_only_the_headmap_maps(tokenizer, tmp_path):
    model = headmap_model(tokenizer)
    assert all(is_headmap(name) for name, p in model.named_parameters() if p.requires_grad)
    before = snapshot(model)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=encoded_dataset(tokenizer),
        data_collator=PromptTargetCollator(tokenizer),
    )
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    check_trained_only_headmap(before, model)

    # what Trainer trained saves and loads back as a HeadMap adapter with the same outputs
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(len(tokenizer)), tmp_path / "adapter").eval()
    batch = PromptTargetCollator(tokenizer)([encoded_dataset(tokenizer)[i] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)


def test_sft_trainer_with_headmap_peft_config_trains_a_headmap_adapter(tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    # TRL's prompt-completion format: the loss is on the completion only (completion_only_loss defaults to True)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["target"]} for r in RECORDS])
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        max_length=None,
        bf16=False,  # TRL defaults to bf16 mixed precision, which needs a GPU (or use_cpu)
    )
    config = HeadMapConfig(target_heads=TARGET, r=4, task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=config,
    )
    model = trainer.model
    assert isinstance(model, PeftModel)
    assert model.peft_config["default"].peft_type == headmap_peft.HEADMAP
    assert model.peft_config["default"].target_heads == TARGET
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_headmap(name) for name in trainable)
    # the labels SFTTrainer builds cover the completion (and the EOS it appends), never the prompt
    sample = trainer.train_dataset[0]
    ids = sample["input_ids"]
    prompt_len = len(tokenizer(RECORDS[0]["prompt"])["input_ids"])
    assert sample["labels"] == [-100] * prompt_len + ids[prompt_len:] and len(ids) == prompt_len + 2
    assert sample["input_ids"][-1] == tokenizer.eos_token_id

    before = snapshot(model)
    trainer.train()
    check_trained_only_headmap(before, model)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, reentrant):
    batch = PromptTargetCollator(tokenizer)([encoded_dataset(tokenizer)[i] for i in range(4)])

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = headmap_model(tokenizer)
        for name, p in model.named_parameters():  # non-zero maps, so that every map gets a gradient
            if is_headmap(name):
                torch.nn.init.normal_(p, std=0.3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()  # reentrant checkpointing needs inputs that require grad
        model.train()
        model(**batch).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 4  # down and up of 2 layers
    for name in plain:
        assert checkpointed[name] is not None and checkpointed[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_trainer_with_gradient_checkpointing_ends_where_training_without_it_does(tokenizer, tmp_path):
    def train(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = headmap_model(tokenizer)
        Trainer(
            model=model,
            args=training_args(tmp_path / str(checkpointing), steps=2, gradient_checkpointing=checkpointing),
            train_dataset=encoded_dataset(tokenizer),
            data_collator=PromptTargetCollator(tokenizer),
        ).train()
        assert model.base_model.model.is_gradient_checkpointing == checkpointing
        return {name: p.detach() for name, p in model.named_parameters() if is_headmap(name)}

    plain, checkpointed = train(False), train(True)
    assert any(torch.count_nonzero(p) for name, p in plain.items() if "headmap_up" in name)  # it did train
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)
