"""The HeadMap tuner on every supported family: init, the map itself, save/load, merge, disable, adapters."""

import copy

import pytest
import torch
from conftest import FAMILIES, make_batch, make_model
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model

from headmap_peft import HeadMapConfig, HeadMapLinear, resolve_architecture

TARGET = {1: [3, 0], 2: [2]}


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def headmap_layers(model):
    return [m for m in model.modules() if isinstance(m, HeadMapLinear)]


def test_identity_at_init_and_only_maps_trainable(family):
    base = make_model(family)
    batch = make_batch()
    expected = logits(base, batch)
    arch = resolve_architecture(base)
    proj = arch.attention_output(base, 1)
    out_features = proj.weight.shape[1] if type(proj).__name__ == "Conv1D" else proj.out_features
    has_bias = proj.bias is not None

    model = get_peft_model(base, HeadMapConfig(target_heads=TARGET, r=4, task_type="CAUSAL_LM"))
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".headmap_down.default." in n or ".headmap_up.default." in n for n in trainable)
    k_dims = [len(h) * arch.head_dim for h in TARGET.values()]
    bias_terms = (4 + out_features) if has_bias else 0
    expected_count = sum(k * 4 + 4 * out_features + bias_terms for k in k_dims)
    assert sum(p.numel() for p in trainable.values()) == expected_count
    assert len(headmap_layers(model)) == len(TARGET)


def test_forward_is_the_method_md_map():
    """o_proj(a) + s * W_up(W_down(a restricted to the selected heads, in the configured order))."""
    base = make_model("llama")
    batch = make_batch()
    arch = resolve_architecture(base)
    seen = {}
    handle = arch.attention_output(base, 1).register_forward_pre_hook(lambda m, a: seen.update(a=a[0].clone()))
    base_logits = logits(base, batch)
    handle.remove()

    model = get_peft_model(
        copy.deepcopy(base), HeadMapConfig(target_heads={1: [3, 0]}, r=3, scaling=0.7, init_weights=False)
    )
    layer = arch.attention_output(model.base_model.model, 1)
    a = seen["a"]
    selected = torch.cat([a[..., 3 * arch.head_dim : 4 * arch.head_dim], a[..., : arch.head_dim]], dim=-1)
    down, up = layer.headmap_down["default"], layer.headmap_up["default"]
    expected = layer.base_layer(a) + 0.7 * (selected @ down.weight.T) @ up.weight.T
    with torch.no_grad():
        torch.testing.assert_close(layer(a), expected)
    assert not torch.allclose(logits(model, batch), base_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_merge_unmerge_disable(family, tmp_path):
    base = make_model(family)
    batch = make_batch()
    base_logits = logits(base, batch)
    original = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, HeadMapConfig(target_heads=TARGET, r=4, init_weights=False))
    adapted = logits(model, batch)
    assert (adapted - base_logits).abs().max() > 1e-3

    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), base_logits, rtol=0, atol=0)

    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(make_model(family), tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), adapted, rtol=0, atol=0)

    model.merge_adapter()
    torch.testing.assert_close(logits(model, batch), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    restored = {k.replace(".base_layer.", "."): v for k, v in model.get_base_model().state_dict().items()}
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=1e-6)
    merged = reloaded.merge_and_unload()
    assert not headmap_layers(merged)
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=1e-5, atol=1e-5)


def test_unmerge_restores_base_weights():
    base = make_model("gpt2")
    arch = resolve_architecture(base)
    before = arch.attention_output(base, 1).weight.detach().clone()
    bias_before = arch.attention_output(base, 1).bias.detach().clone()
    model = get_peft_model(base, HeadMapConfig(target_heads=TARGET, init_weights=False))
    layer = arch.attention_output(model.base_model.model, 1)
    model.merge_adapter()
    assert (layer.base_layer.weight - before).abs().max() > 1e-3
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.base_layer.bias, bias_before, rtol=0, atol=1e-6)


def test_safe_merge_refuses_nan_and_leaves_weights_alone():
    model = get_peft_model(make_model("llama"), HeadMapConfig(target_heads={1: [0]}, init_weights=False))
    layer = headmap_layers(model)[0]
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.headmap_up["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=0)
    assert not layer.merged


def test_bias_auto_follows_the_projection():
    llama = get_peft_model(make_model("llama"), HeadMapConfig(target_heads={1: [0]}))
    gpt2 = get_peft_model(make_model("gpt2"), HeadMapConfig(target_heads={1: [0]}))
    assert headmap_layers(llama)[0].headmap_up["default"].bias is None
    assert headmap_layers(gpt2)[0].headmap_up["default"].bias is not None


def test_bias_true_on_biasless_projection_trains_but_refuses_to_merge():
    base = make_model("llama")
    batch = make_batch()
    model = get_peft_model(base, HeadMapConfig(target_heads=TARGET, bias=True, init_weights=False))
    adapted = logits(model, batch)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="merged bias would be lost"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="bias='auto'"):
        model.merge_adapter()
    # nothing was half-merged: every layer is still wrapped, no weight changed, outputs identical
    assert len(headmap_layers(model)) == len(TARGET) and not any(m.merged for m in headmap_layers(model))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=0)
    torch.testing.assert_close(logits(model, batch), adapted, rtol=0, atol=0)


def test_block_output_placement_adds_after_the_mlp_and_cannot_merge():
    base = make_model("llama")
    batch = make_batch()
    base_logits = logits(base, batch)
    arch = resolve_architecture(base)
    model = get_peft_model(
        base, HeadMapConfig(target_heads={1: [2]}, placement="block_output", init_weights=False, r=2)
    )
    inner = model.base_model.model
    layer = arch.attention_output(inner, 1)
    block = arch.decoder_layer(inner, 1)
    seen = {}
    h1 = layer.register_forward_pre_hook(lambda m, a: seen.update(a=a[0]))
    h2 = block.register_forward_hook(lambda m, a, out: seen.update(out=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        adapted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    h1.remove()
    h2.remove()
    assert (adapted - base_logits).abs().max() > 1e-3
    # the o_proj output itself is unchanged; the map's output reaches the block's output instead
    with torch.no_grad():
        torch.testing.assert_close(layer(seen["a"]), layer.base_layer(seen["a"]))
        layer._block_delta = None
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), base_logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="placement='block_output'"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be folded"):
        model.merge_adapter()
    unloaded = model.unload()
    assert not headmap_layers(unloaded)
    assert not arch.decoder_layer(unloaded, 1)._forward_hooks
    torch.testing.assert_close(logits(unloaded, batch), base_logits, rtol=0, atol=0)


def test_block_output_save_load(tmp_path):
    batch = make_batch()
    model = get_peft_model(
        make_model("gpt2"), HeadMapConfig(target_heads=TARGET, placement="block_output", init_weights=False)
    )
    adapted = logits(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_model("gpt2"), tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), adapted, rtol=0, atol=0)


def test_multiple_adapters_add_set_delete_load(tmp_path):
    batch = make_batch()
    first = HeadMapConfig(target_heads={0: [1]}, init_weights=False)
    second = HeadMapConfig(target_heads={1: [0, 2], 2: [3]}, init_weights=False, placement="block_output")
    base_logits = logits(make_model(), batch)
    solo_a, solo_b, model = make_model(), make_model(), make_model()
    torch.manual_seed(1)
    solo_a = get_peft_model(solo_a, copy.deepcopy(first))
    a_logits = logits(solo_a, batch)
    torch.manual_seed(2)
    solo_b = get_peft_model(solo_b, copy.deepcopy(second), adapter_name="b")
    b_logits = logits(solo_b, batch)
    solo_b.save_pretrained(tmp_path)

    torch.manual_seed(1)
    model = get_peft_model(model, copy.deepcopy(first))
    torch.manual_seed(2)
    model.add_adapter("b", copy.deepcopy(second))
    assert model.active_adapter == "default"
    torch.testing.assert_close(logits(model, batch), a_logits, rtol=0, atol=0)
    # a freshly added adapter is not trainable until set active
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    model.set_adapter("b")
    torch.testing.assert_close(logits(model, batch), b_logits, rtol=0, atol=0)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)

    model.delete_adapter("b")
    assert "b" not in model.peft_config
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, batch), a_logits, rtol=0, atol=0)
    model.load_adapter(tmp_path / "b", adapter_name="b2")  # non-default adapters save to a subfolder
    model.set_adapter("b2")
    torch.testing.assert_close(logits(model, batch), b_logits, rtol=0, atol=0)
    model.delete_adapter("b2")
    model.delete_adapter("default")
    assert not any("headmap_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model.base_model.model, batch), base_logits, rtol=0, atol=0)


def test_merge_named_adapter_only():
    batch = make_batch()
    torch.manual_seed(3)
    model = get_peft_model(make_model(), HeadMapConfig(target_heads={1: [1]}, init_weights=False))
    model.add_adapter("other", HeadMapConfig(target_heads={1: [0], 2: [1]}, init_weights=False))
    adapted = logits(model, batch)
    merged = model.merge_and_unload(adapter_names=["default"])
    assert not headmap_layers(merged)
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "target, match",
    [
        ({3: [0]}, r"target_heads has layer 3 but the model has 3 layers \(0..2\)"),
        ({1: [4]}, r"head 4 in layer 1 but the model has 4 query heads per layer \(0..3\)"),
    ],
)
def test_out_of_range_circuit_leaves_the_model_untouched(target, match):
    base = make_model()
    before = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match=match):
        get_peft_model(base, HeadMapConfig(target_heads=target))
    assert [n for n, _ in base.named_modules()] == before
    assert not hasattr(base, "peft_config")


def test_add_adapter_with_bad_circuit_rolls_back():
    model = get_peft_model(make_model(), HeadMapConfig(target_heads={1: [0]}))
    modules_before = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match="layer 7"):
        model.add_adapter("bad", HeadMapConfig(target_heads={7: [0]}))
    assert "bad" not in model.peft_config
    assert [n for n, _ in model.named_modules()] == modules_before


def test_adapter_from_a_model_of_another_shape_is_refused(tmp_path):
    get_peft_model(make_model("llama"), HeadMapConfig(target_heads={2: [3]})).save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="layer 2 but the model has 2 layers"):
        PeftModel.from_pretrained(small, tmp_path)
    wider = LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4)
    )
    get_peft_model(make_model("llama"), HeadMapConfig(target_heads={2: [1]})).save_pretrained(tmp_path / "b")
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(wider, tmp_path / "b")


class _TinyBlock(torch.nn.Module):
    def __init__(self, width=16, heads=4):
        super().__init__()
        self.mix = torch.nn.Linear(width, width)
        self.attn_out = torch.nn.Linear(width, width, bias=False)

    def forward(self, x):
        return x + self.attn_out(torch.tanh(self.mix(x)))


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_TinyBlock() for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_unknown_architecture_points_to_the_override_which_works():
    net = _TinyNet()
    with pytest.raises(ValueError, match="attention_output_module="):
        get_peft_model(net, HeadMapConfig(target_heads={1: [0]}))
    x = torch.randn(3, 16)
    expected = net(x)
    config = HeadMapConfig(
        target_heads={1: [0, 3]}, attention_output_module="attn_out", num_attention_heads=4, init_weights=False
    )
    model = get_peft_model(net, config)
    assert len(headmap_layers(model)) == 1
    layer = model.base_model.model.blocks[1].attn_out
    assert layer.headmap_down["default"].in_features == 8  # 2 heads of 16 / 4
    assert not torch.allclose(model(x), expected)
    merged = model.merge_and_unload()
    assert isinstance(merged.blocks[1].attn_out, torch.nn.Linear)


def test_auto_peft_model_loads_base_from_local_path(tmp_path):
    base = make_model("qwen2")
    base.save_pretrained(tmp_path / "base")
    batch = make_batch()
    model = get_peft_model(base, HeadMapConfig(target_heads=TARGET, init_weights=False, task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", attn_implementation="eager")
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


def _train_steps(model, batch, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_moves_only_the_maps_and_lowers_the_loss():
    base = make_model()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, HeadMapConfig(target_heads=TARGET, r=4))
    model.train()
    batch = make_batch(batch=4, seq=10)
    losses = _train_steps(model, batch, steps=8)
    assert losses[-1] < losses[0]
    for n, p in model.get_base_model().named_parameters():
        if "headmap_" in n:
            continue
        torch.testing.assert_close(p, frozen[n.replace(".base_layer", "")], rtol=0, atol=0)
    ups = [m.headmap_up["default"].weight for m in headmap_layers(model)]
    assert all(w.abs().max() > 0 for w in ups)


def _grads(model, batch):
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "placement, reentrant", [("attention_output", False), ("attention_output", True), ("block_output", False)]
)
def test_gradient_checkpointing_gives_the_same_gradients(placement, reentrant):
    batch = make_batch()
    config = HeadMapConfig(target_heads=TARGET, init_weights=False, placement=placement)
    torch.manual_seed(0)
    plain = get_peft_model(make_model(), copy.deepcopy(config))
    torch.manual_seed(0)
    ckpt = get_peft_model(make_model(), copy.deepcopy(config))
    plain.train()
    ckpt.train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ckpt.enable_input_require_grads()
    expected = _grads(plain, batch)
    got = _grads(ckpt, batch)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_block_output_refuses_reentrant_checkpointing_instead_of_losing_gradients():
    model = get_peft_model(
        make_model(), HeadMapConfig(target_heads=TARGET, init_weights=False, placement="block_output")
    )
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    with pytest.raises(RuntimeError, match="use_reentrant"):
        model(**make_batch())
    with torch.no_grad():  # evaluating without gradients stays allowed
        assert torch.isfinite(model(**make_batch()).loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_float32_maps_and_trains(dtype):
    base = make_model().to(dtype)
    model = get_peft_model(base, HeadMapConfig(target_heads=TARGET, init_weights=False))
    assert all(m.headmap_down["default"].weight.dtype == torch.float32 for m in headmap_layers(model))
    model.train()
    out = model(**make_batch())
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(m.headmap_up["default"].weight.grad is not None for m in headmap_layers(model))


def test_bf16_autocast_forward_and_backward():
    model = get_peft_model(make_model(), HeadMapConfig(target_heads=TARGET, init_weights=False))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**make_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(m.headmap_down["default"].weight.grad.abs().sum() > 0 for m in headmap_layers(model))


def test_torch_compile_matches_eager():
    batch = make_batch()
    model = get_peft_model(make_model(), HeadMapConfig(target_heads=TARGET, init_weights=False))
    expected = logits(model, batch)
    compiled = torch.compile(model)
    with torch.no_grad():
        got = compiled(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
