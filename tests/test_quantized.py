"""HeadMap on bitsandbytes 8-bit and 4-bit bases (these run on the CPU with bitsandbytes >= 0.45)."""

import pytest
import torch
from conftest import make_batch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from headmap_peft import HeadMapConfig, HeadMapLinear

bnb = pytest.importorskip("bitsandbytes")

TARGET = {1: [3, 0], 2: [2]}
QUANT = {
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
    "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
}
LAYER_TYPES = {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    # the 4-bit CPU kernels want input widths that are multiples of their block size (64)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    path = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load(path, kind):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QUANT[kind], attn_implementation="eager")


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_base_init_train_save_load_merge(saved_base, tmp_path, kind):
    batch = make_batch()
    base = load(saved_base, kind)
    base_logits = logits(base, batch)
    model = get_peft_model(base, HeadMapConfig(target_heads=TARGET, r=4))
    layers = [m for m in model.modules() if isinstance(m, HeadMapLinear)]
    assert len(layers) == 2 and all(type(m.base_layer).__name__ == LAYER_TYPES[kind] for m in layers)
    torch.testing.assert_close(logits(model, batch), base_logits, rtol=0, atol=0)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    trained = logits(model, batch)
    assert (trained - base_logits).abs().max() > 1e-3

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load(saved_base, kind), tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), trained, rtol=0, atol=0)

    with pytest.warns(UserWarning, match="requantizes"):
        merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, HeadMapLinear) for m in merged.modules())
    proj = merged.model.layers[1].self_attn.o_proj
    assert type(proj).__name__ == LAYER_TYPES[kind]
    merged_logits = logits(merged, batch)
    # requantisation rounds the merged weight: close to the unmerged outputs, and much closer than the base is
    merge_error = (merged_logits - trained).abs().max().item()
    assert merge_error < 0.5 * (trained - base_logits).abs().max().item()


def test_8bit_unmerge_comes_back_to_the_base_within_rounding(saved_base):
    batch = make_batch()
    base = load(saved_base, "8bit")
    base_logits = logits(base, batch)
    model = get_peft_model(base, HeadMapConfig(target_heads=TARGET, init_weights=False))
    adapted = logits(model, batch)
    with pytest.warns(UserWarning):
        model.merge_adapter()
    merged = logits(model, batch)
    model.unmerge_adapter()
    unmerged = logits(model, batch)
    with model.disable_adapter():
        disabled = logits(model, batch)
    shift = (adapted - base_logits).abs().max().item()
    assert (merged - adapted).abs().max().item() < 0.5 * shift
    assert (unmerged - adapted).abs().max().item() < 0.5 * shift
    assert (disabled - base_logits).abs().max().item() < 0.5 * shift
