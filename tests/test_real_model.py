"""Real-model tier: the built-in default SmolLM2-135M-Instruct from the PyPI package.

Selected with ``-m real_model``; it runs in CI too (the GGUF is converted once into the cache).
"""

from __future__ import annotations

import pytest
import torch

from swiftkv.models.full_sequence import full_logits, greedy_generate
from swiftkv.models.loader import load_model, load_tokenizer

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def default_model():
    model, path = load_model()  # the built-in default
    return model, path, load_tokenizer(path)


def test_default_model_matches_transformers(default_model):
    from transformers import LlamaForCausalLM as HFLlama

    model, path, tok = default_model
    hf = HFLlama.from_pretrained(path, dtype=torch.float32).eval()
    text = "The quick brown fox jumps over the lazy dog. SwiftKV makes prefill cheaper by"
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = full_logits(model, [ids])[0]
    diff = (ours - ref).abs().max().item()
    print(f"max |logit diff| vs transformers on the default model (fp32): {diff:.3e}")
    assert diff < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_default_model_answers_sensibly(default_model):
    model, _, tok = default_model
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    out = greedy_generate(model, list(ids), 24, {tok.eos_token_id})
    text = tok.decode(out, skip_special_tokens=True)
    assert "Paris" in text, text
