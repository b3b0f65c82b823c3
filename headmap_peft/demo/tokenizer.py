"""A word-level tokenizer over the demo corpus vocabulary (deterministic: same words, same ids)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .corpus import SPECIAL_TOKENS, vocabulary


def build_tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel tokenizer with a whitespace pre-tokenizer; special tokens first, then the sorted corpus words.

    Encoding adds ``<s>`` in front; decoding joins words with single spaces.
    """
    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    vocab = {token: i for i, token in enumerate(specials + vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.padding_side = "right"
    return tokenizer
