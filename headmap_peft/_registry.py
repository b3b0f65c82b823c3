"""Registration of the HEADMAP method with PEFT (idempotent)."""

from __future__ import annotations

from peft.utils.peft_types import PeftType


def _peft_type_member(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding the member to PEFT's enum if this PEFT release does not have it yet."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    # the order matters: EnumType.__setattr__ refuses to reassign names already in the member map
    type.__setattr__(PeftType, name, member)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    return member


HEADMAP = _peft_type_member("HEADMAP")


def register() -> None:
    """Make PEFT know HEADMAP: get_peft_model, PeftModel.from_pretrained and PeftConfig.from_pretrained use it."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from .config import HeadMapConfig
    from .model import HeadMapModel

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(HEADMAP) is HeadMapConfig:
        return
    register_peft_method(
        name="headmap",
        config_cls=HeadMapConfig,
        model_cls=HeadMapModel,
        prefix="headmap_",
    )
