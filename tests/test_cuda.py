"""The tuner on a CUDA GPU (skipped without one): placement, merge, save/load, 8-bit, bf16 training."""

import pytest
import torch
from conftest import make_batch, make_model
from peft import PeftModel, get_peft_model

from headmap_peft import HeadMapConfig, HeadMapLinear

pytestmark = pytest.mark.cuda

TARGET = {1: [3, 0], 2: [2]}


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"].cuda(), attention_mask=batch["attention_mask"].cuda()).logits


def test_adapter_lives_on_the_gpu_and_merges_exactly(tmp_path):
    batch = make_batch()
    model = get_peft_model(make_model().cuda(), HeadMapConfig(target_heads=TARGET, init_weights=False))
    layers = [m for m in model.modules() if isinstance(m, HeadMapLinear)]
    assert all(m.headmap_down["default"].weight.is_cuda and m.headmap_columns["default"].is_cuda for m in layers)
    adapted = _logits(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_model().cuda(), tmp_path)
    torch.testing.assert_close(_logits(reloaded, batch), adapted)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(_logits(merged, batch), adapted, rtol=1e-4, atol=1e-4)


def test_bf16_training_step_on_gpu():
    model = get_peft_model(make_model().cuda().to(torch.bfloat16), HeadMapConfig(target_heads=TARGET))
    model.train()
    batch = {k: v.cuda() for k, v in make_batch().items()}
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [m.headmap_up["default"].weight.grad for m in model.modules() if isinstance(m, HeadMapLinear)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_8bit_base_on_gpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_model().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": 0}
    )
    batch = make_batch()
    base_logits = _logits(base, batch)
    model = get_peft_model(base, HeadMapConfig(target_heads=TARGET, init_weights=False))
    adapted = _logits(model, batch)
    shift = (adapted - base_logits).abs().max().item()
    assert shift > 1e-3
    merged = model.merge_and_unload()
    assert (_logits(merged, batch) - adapted).abs().max().item() < 0.5 * shift
