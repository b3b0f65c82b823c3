"""Merge / unmerge exactness of HeadMap adapters, measured on tiny models of every supported family.

    python benchmarks/merge_error.py

Prints, per family, the max abs difference of the logits between the unmerged adapter and (a) the merged model,
(b) merge_and_unload, and the max abs difference of the projection weights after merge + unmerge vs the original.
Adapters start from random non-zero maps (init_weights=False, scaled by SCALING) so the merge has something to
fold in.
"""

from __future__ import annotations

import platform
import tempfile
import warnings

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from headmap_peft import HeadMapConfig, HeadMapLinear

FAMILIES = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=1, head_dim=64)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=64)),
    "gemma3": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=64, sliding_window=16)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=4, pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", {}),
}
COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
TARGET = {1: [3, 0], 2: [2], 3: [1, 2]}
# random maps are far larger than trained ones; scale them to change the projection weights by a few percent, as a
# fine-tuned adapter does, so the requantisation error of the 8/4-bit rows is seen at a realistic size
SCALING = 0.02


def _configs():
    import transformers

    out = {name: getattr(transformers, cls)(**COMMON, **extra) for name, (cls, extra) in FAMILIES.items()}
    out["gpt2"] = transformers.GPT2Config(
        vocab_size=256, n_embd=128, n_layer=4, n_head=4, bos_token_id=1, eos_token_id=2
    )
    out["opt"] = transformers.OPTConfig(
        vocab_size=256,
        hidden_size=128,
        ffn_dim=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        word_embed_proj_dim=128,
    )
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _projection_weights(model) -> list[torch.Tensor]:
    """The (dequantised) weights of the wrapped projections."""
    return [m.get_base_weight().detach().float().clone() for m in model.modules() if isinstance(m, HeadMapLinear)]


def measure(base, ids) -> tuple[float, float, float, float]:
    """(adapter effect, merged error, merge_and_unload error, weight error after unmerge), all max abs."""
    plain = _logits(base, ids)
    torch.manual_seed(0)
    model = get_peft_model(base, HeadMapConfig(target_heads=TARGET, init_weights=False, scaling=SCALING))
    before = _projection_weights(model)
    unmerged = _logits(model, ids)
    model.merge_adapter()
    merged = _logits(model, ids)
    model.unmerge_adapter()
    after = _projection_weights(model)
    restore = max((a - b).abs().max().item() for a, b in zip(after, before))
    unloaded = _logits(model.merge_and_unload(), ids)
    return tuple(
        float(v)
        for v in (
            (unmerged - plain).abs().max(),
            (merged - unmerged).abs().max(),
            (unloaded - unmerged).abs().max(),
            restore,
        )
    )


def main() -> None:
    warnings.filterwarnings("ignore", message=".*(MatMul8bitLt|requantizes).*")
    ids = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    print(f"machine: {platform.platform()}, torch {torch.__version__}, float32 unless stated")
    print("| family | adapter effect | merged vs unmerged | merge_and_unload vs unmerged | weights after unmerge |")
    print("|---|---:|---:|---:|---:|")
    for family, config in _configs().items():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        print(f"| {family} | {'| '.join(f'{v:.2e} ' for v in measure(base, ids))}|")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=2)).save_pretrained(tmp)
        for label, quant in {
            "llama 8-bit": BitsAndBytesConfig(load_in_8bit=True),
            "llama 4-bit": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            ),
        }.items():
            base = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant)
            print(f"| {label} (requantised) | {'| '.join(f'{v:.2e} ' for v in measure(base, ids))}|")


if __name__ == "__main__":
    main()
