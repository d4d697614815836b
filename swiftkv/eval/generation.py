"""Generation through the engine, teacher vs SwiftKV: GSM8K, greedy-answer agreement on held-out
chats, and rule-scored verifiable instructions."""

from __future__ import annotations

from swiftkv.engine.llm_engine import EngineConfig
from swiftkv.eval.instructions import INSTRUCTIONS
from swiftkv.eval.loglik import MODES
from swiftkv.eval.metrics import gsm8k_exact_match
from swiftkv.eval.tasks import GenItem
from swiftkv.llm import LLM
from swiftkv.models.llama import LlamaForCausalLM
from swiftkv.sampling_params import SamplingParams


def greedy_both(
    model: LlamaForCausalLM, tokenizer, prompts: list[list[int]], params: SamplingParams,
    config: EngineConfig | None = None,
) -> dict[str, list[tuple[list[int], str]]]:
    """Greedy outputs ``(token_ids, text)`` of every prompt under the teacher and SwiftKV.

    The same loaded model serves both (one engine per path, one after the other).
    """
    out = {}
    for mode in MODES:
        if mode == "swiftkv" and model.swiftkv_config.is_baseline:
            out[mode] = out["teacher"]  # l == L: SwiftKV is the teacher
            continue
        llm = LLM.from_model(model, tokenizer, config=config, swiftkv=mode == "swiftkv")
        res = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=True)
        out[mode] = [(list(r.outputs[0].token_ids), r.outputs[0].text) for r in res]
        del llm  # its KV cache, before the next one's
    return out


def run_gsm8k(model, tokenizer, items: list[GenItem], max_tokens: int = 256) -> dict[str, list[float]]:
    """8-shot chain-of-thought, greedy; exact match on the final number (per item, per mode)."""
    keep = model.config.max_position_embeddings - max_tokens  # long 8-shot prompts lose their oldest shots
    if keep < 1:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for a prompt in this model's context")
    prompts = [tokenizer(it.prompt, add_special_tokens=False)["input_ids"][-keep:] for it in items]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=["\n\nQuestion:", "Question:"])
    outs = greedy_both(model, tokenizer, prompts, params)
    return {m: [gsm8k_exact_match(text, it.answer) for (_, text), it in zip(outs[m], items)] for m in MODES}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def chat_agreement(model, tokenizer, prompts: list[list[int]], max_tokens: int = 32) -> dict[str, float]:
    """How many tokens SwiftKV's greedy answer follows the teacher's before the first difference
    (mean, answers capped at ``max_tokens``) and the share of identical answers."""
    outs = greedy_both(model, tokenizer, prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    t, s = [o[0] for o in outs["teacher"]], [o[0] for o in outs["swiftkv"]]
    lens = [common_prefix(a, b) for a, b in zip(t, s)]
    same = [a == b for a, b in zip(t, s)]
    return {"num_prompts": len(prompts), "max_tokens": max_tokens,
            "mean_prefix_tokens": sum(lens) / max(1, len(lens)), "identical_share": sum(same) / max(1, len(same))}


def run_instructions(model, tokenizer, max_tokens: int = 160) -> dict[str, list[float]]:
    """Chat-templated verifiable instructions; per instruction 1.0 when the rule holds."""
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": ins.prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)) for ins in INSTRUCTIONS]
    outs = greedy_both(model, tokenizer, prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return {m: [float(ins.check(text)) for ins, (_, text) in zip(INSTRUCTIONS, outs[m])] for m in MODES}
