"""The model card of a saved HeadMap adapter: PEFT's card plus the headmap tag and the circuit summary."""

import pytest
from conftest import make_model
from peft import get_peft_model

from headmap_peft import HeadMapConfig
from headmap_peft.hub import SECTION_HEADING, update_model_card


def test_card_has_headmap_tag_and_one_circuit_section(tmp_path):
    config = HeadMapConfig(target_heads={1: [3, 0], 2: [2]}, r=4, task_type="CAUSAL_LM")
    model = get_peft_model(make_model(), config)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "- headmap" in card and "library_name: peft" in card
    update_model_card(str(tmp_path), config)
    update_model_card(str(tmp_path), config)  # idempotent: replaces its own section
    card = (tmp_path / "README.md").read_text()
    assert card.count(SECTION_HEADING) == 1
    assert "| 1 | 3, 0 |" in card and "| 2 | 2 |" in card and "rank 4" in card
    assert "of 2 layers (3 heads in all)" in card
    assert "- PEFT " in card  # PEFT's own content is kept


def test_summary_of_a_one_layer_one_head_circuit_is_singular():
    from headmap_peft.hub import circuit_summary

    assert "of 1 layer (1 head in all)" in circuit_summary(HeadMapConfig(target_heads={0: [2]}))


def test_update_model_card_needs_a_saved_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        update_model_card(str(tmp_path), HeadMapConfig(target_heads={0: [0]}))
