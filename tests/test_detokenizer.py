"""Incremental detokenisation against the tokenizer's own full decode."""

from __future__ import annotations

import pytest

from swiftkv.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model_dir):
    from swiftkv.models.loader import load_tokenizer

    return load_tokenizer(tiny_chat_model_dir)


@pytest.mark.parametrize("text", ["🚀🚀🚀 launch", "Grüße aus Köln, naïve café", "日本語のテキスト", "plain ascii, spaces  ",
                                  "<|im_start|>assistant\nHi<|im_end|>"])
def test_deltas_concatenate_to_the_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, skip)
        deltas = [detok.update([t]) for t in ids]
        deltas.append(detok.flush())
        assert "".join(deltas) == detok.text == tokenizer.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)  # no half characters were ever sent


def test_an_incomplete_character_is_held_back_then_flushed(tokenizer):
    ids = tokenizer("🚀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # the emoji's bytes span several tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.update(ids[:1]) == ""  # an incomplete UTF-8 sequence is not sent
    assert detok.flush() == tokenizer.decode(ids[:1])  # at the end: exactly what a full decode shows
