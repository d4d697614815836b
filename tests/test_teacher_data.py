"""Teacher-response data (swiftkv.distill.teacher_data): prompt selection, the teacher's own replies
in chat JSONL that distillation reads, per-conversation seeds, and a killed run that resumes."""

from __future__ import annotations

import json

import pytest
from conftest import random_chats

from swiftkv.data.conversations import is_held_out, load_conversations
from swiftkv.distill.teacher_data import (
    first_prompt,
    select_prompts,
    write_teacher_data,
)
from swiftkv.llm import LLM
from swiftkv.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def setup(tiny_chat_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "chats.jsonl"
    chats = random_chats(40, seed=2)
    chats.append({"id": "long", "messages": [{"role": "user", "content": "alpha " * 300},
                                             {"role": "assistant", "content": "beta"}]})
    data.write_text("\n".join(json.dumps(c) for c in chats))
    llm = LLM(tiny_chat_model_dir, swiftkv=False, dtype="float32", max_num_seqs=8)
    return llm, load_conversations(str(data))


def test_first_prompt_is_what_precedes_the_first_reply():
    u1, a1, u2 = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                  {"role": "user", "content": "q2"})
    sys_msg = {"role": "system", "content": "s"}
    assert first_prompt([sys_msg, u1, a1, u2]) == [sys_msg, u1]
    assert first_prompt([u1, u2]) is None  # no reply to imitate
    assert first_prompt([sys_msg, a1]) is None  # a reply without a user prompt


def test_prompts_fill_both_splits_and_skip_long_ones(setup):
    llm, convs = setup
    got = select_prompts(llm.tokenizer, convs, num=6, held_out=3, max_prompt_tokens=64, fraction=0.2)
    held = [cid for cid, _, _ in got if is_held_out(cid, 0.2)]
    assert len(got) == 9 and len(held) == 3
    assert "long" not in {cid for cid, _, _ in got}
    for cid, msgs, ids in got:
        assert msgs[-1]["role"] == "user" and len(ids) <= 64
        assert ids == list(llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                             return_dict=False))


def test_replies_are_the_teachers_and_distillation_reads_them(setup, tmp_path):
    llm, convs = setup
    prompts = select_prompts(llm.tokenizer, convs, num=5, held_out=0, max_prompt_tokens=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    stats = write_teacher_data(llm, prompts, tmp_path / "t.jsonl", greedy, chunk=2, progress=False)
    assert stats["conversations"] + stats["empty"] == 5 and stats["reply_tokens"] > 0
    written = load_conversations(str(tmp_path / "t.jsonl"))
    by_id = {cid: (msgs, ids) for cid, msgs, ids in prompts}
    for cid, msgs in written:
        prompt, ids = by_id[cid]
        assert msgs[:-1] == prompt and msgs[-1]["role"] == "assistant"
        alone = llm.generate(prompt_token_ids=[ids], sampling_params=greedy)[0].outputs[0].text
        assert msgs[-1]["content"] == alone
    with pytest.raises(ValueError, match="exists"):
        write_teacher_data(llm, prompts, tmp_path / "t.jsonl", greedy, progress=False)


def test_killed_run_resumes_to_the_same_file(setup, tmp_path):
    llm, convs = setup
    prompts = select_prompts(llm.tokenizer, convs, num=7, held_out=2, max_prompt_tokens=64, fraction=0.2)
    sampled = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=10, seed=3)
    write_teacher_data(llm, prompts, tmp_path / "whole.jsonl", sampled, chunk=9, progress=False)
    assert len((tmp_path / "whole.jsonl").read_text().splitlines()) >= 8

    class Killed(Exception):
        pass

    class DiesAfterOneChunk:
        def __init__(self):
            self.calls = 0

        def generate(self, **kw):
            self.calls += 1
            if self.calls > 1:
                raise Killed
            return llm.generate(**kw)

    out = tmp_path / "part.jsonl"
    with pytest.raises(Killed):
        write_teacher_data(DiesAfterOneChunk(), prompts, out, sampled, chunk=3, progress=False)
    partial = tmp_path / ".part.jsonl.partial"
    assert not out.exists() and len(partial.read_text().splitlines()) == 3
    with open(partial, "a") as f:
        f.write('{"id": "c1", "messa')  # a kill in the middle of a line
    write_teacher_data(llm, prompts, out, sampled, chunk=4, progress=False)  # other chunks, same replies
    assert not partial.exists()
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()


def test_generate_takes_one_sampling_params_per_prompt(setup):
    llm, _ = setup
    a, b = SamplingParams(temperature=0.0, max_tokens=3), SamplingParams(temperature=0.0, max_tokens=5)
    outs = llm.generate(prompt_token_ids=[[1, 2, 3], [1, 2, 3]], sampling_params=[a, b])
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    with pytest.raises(ValueError, match="2 sampling_params for 1 prompts"):
        llm.generate(prompt_token_ids=[[1, 2]], sampling_params=[a, b])
