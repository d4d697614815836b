"""Incremental detokenisation: each step decodes a few tokens, not a sequence's whole output.

The prefix/read-offset scheme of vLLM and TGI: decode ``ids[prefix:]`` and ``ids[prefix:read]``
and append the difference. Decoding with a few tokens of left context keeps tokenizer-specific
spacing (SentencePiece's leading "▁", byte-level merges) exactly as a full decode has it. A tail
that ends in an incomplete UTF-8 character (decoded as U+FFFD) is held back until the next token
completes it, so the text only ever grows by appending: a stream of deltas concatenates to the
final text. At the end, :meth:`flush` appends whatever is held back, so the final text equals
``tokenizer.decode(all_output_ids)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_REPLACEMENT = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    """Text of one sequence's output tokens, extended one step at a time."""

    tokenizer: object
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0  # ids[prefix_offset:read_offset] is context already in ``text``
    read_offset: int = 0  # ids[read_offset:] are not yet in ``text``

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, new_ids: list[int]) -> str:
        """Add tokens; return the text appended (may be "" while a character is incomplete)."""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # nothing printable yet, or an incomplete UTF-8 tail: hold it back
        delta = new_text[len(prefix_text) :]
        self.text += delta
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta

    def flush(self) -> str:
        """At the end of the sequence: append what was held back (as the full decode shows it)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        delta = new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else ""
        self.text += delta
        self.prefix_offset = self.read_offset = len(self.ids)
        return delta
