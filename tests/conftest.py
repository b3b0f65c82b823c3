"""Tiny models of every supported family, built from configs (no hub access)."""

from __future__ import annotations

import socket
import sys

import pytest
import torch

import headmap_peft  # noqa: F401  (registers the tuner)

# tiny models: one thread is far faster than two on shared cores (thread start-up dominates)
torch.set_num_threads(1)

VOCAB = 96


def _configs():
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    return {
        "llama": lambda: LlamaConfig(**common, num_key_value_heads=2),
        "mistral": lambda: MistralConfig(**common, num_key_value_heads=2),
        "qwen2": lambda: Qwen2Config(**common, num_key_value_heads=2),
        "qwen3": lambda: Qwen3Config(**common, num_key_value_heads=2, head_dim=8),
        # Gemma's heads are wider than hidden_size / num_heads: H * d_h != d
        "gemma": lambda: GemmaConfig(**common, num_key_value_heads=1, head_dim=16),
        "gemma2": lambda: Gemma2Config(**common, num_key_value_heads=2, head_dim=16),
        "gemma3": lambda: Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=16, sliding_window=8),
        "phi3": lambda: Phi3Config(**common, num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt2": lambda: GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        ),
        "gpt_neox": lambda: GPTNeoXConfig(**common),
        "opt": lambda: OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        ),
    }


FAMILIES = sorted(_configs())


def make_model(family: str = "llama", seed: int = 0):
    """A tiny randomly initialised causal LM of `family`, in eval mode, float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[family]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def two_process_launch(script) -> list[str]:
    """The command that runs `script` in 2 CPU processes (gloo) under accelerate.

    `accelerate launch --cpu --num_processes 2` starts a single process unless MPI is installed; accelerate's
    torchrun launcher (`--multi_gpu`) starts 2 CPU processes when CUDA is hidden (CUDA_VISIBLE_DEVICES="").
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={port}",
        str(script),
    ]


def make_batch(batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, seq), generator=gen)
    labels = input_ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
