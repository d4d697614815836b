"""Verifiable instructions (IFEval-style), each scored by a rule on the model's reply."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.strip().splitlines() if ln.strip()]


def _bullets(text: str) -> int:
    return sum(1 for ln in _lines(text) if re.match(r"^([-*•]|\d+[.)])\s+", ln))


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _paragraphs(text: str) -> int:
    return len([p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()])


def _json_object(text: str) -> bool:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        obj = json.loads(body)
    except ValueError:
        return False
    return isinstance(obj, dict) and {"name", "age"} <= set(obj)


@dataclass(frozen=True)
class Instruction:
    """A prompt and the rule its reply must satisfy."""

    id: str
    prompt: str
    check: Callable[[str], bool]


INSTRUCTIONS: list[Instruction] = [
    Instruction("bullets_3", "List benefits of regular exercise. Answer with exactly 3 bullet points, "
                "each line starting with '- ', and nothing else.", lambda t: _bullets(t) == 3),
    Instruction("lowercase", "Describe the ocean in two sentences. Your entire reply must be in lowercase "
                "letters; no capital letters at all.", lambda t: any(c.isalpha() for c in t) and t == t.lower()),
    Instruction("uppercase", "What is the capital of France? Your entire reply must be in CAPITAL LETTERS.",
                lambda t: any(c.isalpha() for c in t) and t == t.upper()),
    Instruction("include_word", "Write one short sentence about cats that includes the word 'banana'.",
                lambda t: "banana" in t.lower()),
    Instruction("one_word", "Name a fruit. Reply with a single word only.", lambda t: len(_words(t)) == 1),
    Instruction("no_commas", "Write two sentences about the sun without using any commas.",
                lambda t: bool(_words(t)) and "," not in t),
    Instruction("max_20_words", "Explain what a computer is in fewer than 20 words.",
                lambda t: 0 < len(_words(t)) < 20),
    Instruction("title_brackets", "Suggest a title for a story about a dragon. Wrap the title in double angular "
                "brackets, like <<title>>.", lambda t: re.search(r"<<[^<>]+>>", t) is not None),
    Instruction("end_phrase", "Write a short poem about rain. End your reply with the exact phrase "
                "'Is there anything else I can help with?'",
                lambda t: t.strip().endswith("Is there anything else I can help with?")),
    Instruction("json", "Describe a fictional person as a JSON object with the keys \"name\" and \"age\". "
                "Output only the JSON.", _json_object),
    Instruction("two_paragraphs", "Tell me about Paris in exactly 2 paragraphs separated by a blank line.",
                lambda t: _paragraphs(t) == 2),
    Instruction("start_word", "What is 2 + 2? Start your reply with the word 'Answer:'.",
                lambda t: t.strip().startswith("Answer:")),
    Instruction("numbered_5", "Give a numbered list of 5 colors, one per line, like '1. red'.",
                lambda t: sum(1 for ln in _lines(t) if re.match(r"^\d+[.)]\s+", ln)) == 5),
    Instruction("no_letter_e", "Write a sentence about a dog without using the letter 'e'.",
                lambda t: bool(_words(t)) and "e" not in t.lower()),
    Instruction("quote", "Say hello to the user, wrapping your entire reply in double quotation marks.",
                lambda t: len(t.strip()) > 2 and t.strip()[0] == '"' and t.strip()[-1] == '"'),
    Instruction("placeholder", "Write a short letter template with at least 2 placeholders in square brackets, "
                "such as [name].", lambda t: len(re.findall(r"\[[^\[\]]+\]", t)) >= 2),
]
