"""HeadMapModel: the PEFT tuner that wraps the attention output projections of a circuit's layers."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .architectures import resolve_architecture
from .config import HeadMapConfig
from .layer import HeadMapLayer, HeadMapLinear


class HeadMapModel(BaseTuner):
    """Adds HeadMap adapters (ICLR 2025) to a transformers decoder; created by ``get_peft_model(model, config)``.

    ```python
    import headmap_peft  # registers the HEADMAP tuner with PEFT
    from peft import get_peft_model

    config = HeadMapConfig(target_heads={3: [0, 5], 4: [2, 7]}, r=8, task_type="CAUSAL_LM")
    model = get_peft_model(base_model, config)
    ```
    """

    prefix: str = "headmap_"
    tuner_layer_cls = HeadMapLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: HeadMapConfig, model_config: dict) -> HeadMapConfig:
        return peft_config

    def _prepare_model(self, peft_config: HeadMapConfig, model: nn.Module) -> None:
        # Every check happens here, before any module is replaced, so a bad config leaves the model untouched.
        arch = resolve_architecture(
            model,
            attention_output_module=peft_config.attention_output_module,
            num_attention_heads=peft_config.num_attention_heads,
        )
        arch.check_heads(peft_config.target_heads)
        self._injection_arch = arch  # read by the two methods below while PEFT injects this config

    def _post_injection_hook(self, model: nn.Module, config: HeadMapConfig, adapter_name: str) -> None:
        if hasattr(model, "add_model_tags"):  # transformers models: PEFT copies these tags into the model card
            model.add_model_tags(["headmap"])

    def _check_new_adapter_config(self, config: HeadMapConfig) -> None:
        # PEFT allows one adapter "with bias" (a trained base-model bias); HeadMap's biases are its own, per adapter.
        return None

    def _check_target_module_exists(self, peft_config: HeadMapConfig, key: str) -> bool:
        layer = self._injection_arch.layer_of(key)
        return layer is not None and layer in peft_config.target_heads

    def _create_and_replace(
        self,
        peft_config: HeadMapConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        arch = self._injection_arch
        layer = arch.layer_of(current_key)
        kwargs = {
            "heads": peft_config.target_heads[layer],
            "r": peft_config.r,
            "scaling": peft_config.scaling,
            "bias": peft_config.bias,
            "placement": peft_config.placement,
            "init_weights": peft_config.init_weights,
            "inference_mode": peft_config.inference_mode,
        }
        if isinstance(target, HeadMapLayer):
            target.update_layer(adapter_name, **kwargs)
            new_module = target
        else:
            new_module = HeadMapLinear(target, adapter_name, head_dim=arch.head_dim, **kwargs)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)  # an added adapter is not trainable until it is set active
            self._replace_module(parent, target_name, new_module, target)
        if peft_config.placement == "block_output":
            new_module.attach_block_hook(arch.decoder_layer(self.model, layer))

    # PEFT's generic code reads `config.bias` as LoRA's "which base-model biases to train". HeadMap's `bias` only
    # shapes the adapter's own maps, so the three places that read it are specialised here.

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        adapter_params = {
            id(p)
            for layer in self._headmap_layers()
            for p in (*layer.headmap_down.parameters(), *layer.headmap_up.parameters())
        }
        for param in model.parameters():
            if id(param) not in adapter_params:
                param.requires_grad = False

    def disable_adapter_layers(self) -> None:
        self._enable_adapter_layers(enabled=False)

    @classmethod
    def _get_learnable_bias_state_dict(cls, model, state_dict, config) -> dict[str, torch.Tensor]:
        return {}  # the maps' biases are saved with the maps; no base-model bias is trained

    def _headmap_layers(self) -> list[HeadMapLayer]:
        return [module for module in self.model.modules() if isinstance(module, HeadMapLayer)]

    def _check_mergeable(self, adapter_names: list[str] | None = None) -> None:
        """Raise before anything is merged if one of the adapters to merge cannot be (see HeadMapLayer)."""
        for layer in self._headmap_layers():
            for name in layer.active_adapters if adapter_names is None else adapter_names:
                if name in layer.headmap_down:
                    layer.check_mergeable(name)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            self._check_mergeable(adapter_names)
        layers = self._headmap_layers()
        model = super()._unload_and_optionally_merge(
            merge=merge,
            progressbar=progressbar,
            safe_merge=safe_merge,
            adapter_names=adapter_names,
        )
        for layer in layers:
            layer.detach_block_hook()
        return model
