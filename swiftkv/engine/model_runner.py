"""Packs scheduled work into one flat batch, runs the model over the paged KV cache, samples.

The KV cache holds one K/V per *KV owner* (see :class:`swiftkv.config.SwiftKVConfig`): with
AcrossKV it is really smaller, not just shared.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from swiftkv.engine.scheduler import SchedulerOutput
from swiftkv.engine.sequence import Sequence
from swiftkv.layers.attention import AttentionMetadata
from swiftkv.layers.fused_decode import FusedDecoder
from swiftkv.layers.sampler import Sampler, apply_penalties
from swiftkv.memory import no_huge_pages
from swiftkv.models.arch import head_dim_of, kv_bytes_per_token
from swiftkv.models.llama import LlamaForCausalLM


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; on CPU from ``calloc`` (numpy's zeros), whose pages the OS maps on first write: a large KV
    cache takes memory as its blocks fill, not all at once (``torch.zeros`` writes every page)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    t = torch.from_numpy(np.zeros(nbytes, dtype=np.uint8))
    no_huge_pages(t)  # small pages: memory as blocks fill, not 2 MB per head region on its first write
    return t.view(dtype).view(shape)


class ModelRunner:
    """Runs one model (prepared for inference once: :meth:`~swiftkv.models.llama.SwiftKVCausalLM.prepare_for_inference`)
    over its paged KV cache. Decode steps run the layers in one native call where the layers' own
    descriptions allow it (:class:`~swiftkv.layers.fused_decode.FusedDecoder`, decided here, once)."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, swiftkv: bool) -> None:
        self.model, self.swiftkv = model, swiftkv
        model.prepare_for_inference()  # a no-op for a model loaded for inference
        self.block_size = block_size
        cfg = model.config
        self.device, self.dtype = model.compute_device, model.compute_dtype
        self.skv = model.layout(swiftkv)
        self.fused = FusedDecoder.build(model.decode_dims(), model.decode_specs(), model.store_kv_spec(),
                                        model.swiftkv_config)
        # [owners, K/V, kv_heads, blocks, block_size, head_dim], allocated once
        self.kv_cache = _zeros((self.skv.num_kv_owners, 2, cfg.num_key_value_heads, num_blocks, block_size,
                                head_dim_of(cfg)), self.dtype, self.device)
        self.sampler = Sampler()
        self.eos_token_ids: set[int] = set()  # set by the engine: masked before min_tokens

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.model.config, self.skv, self.dtype)

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat token ids, positions, attention metadata, and the batch rows that need logits."""
        bs = self.block_size
        ids: list[int] = []
        q_lens, kv_lens, needs_logits = [], [], []
        for i, (seq, n) in enumerate(zip(out.seqs, out.num_tokens)):
            c = seq.num_computed_tokens
            ids.extend(seq.token_ids[c : c + n])
            q_lens.append(n)
            kv_lens.append(c + n)
            if c + n == seq.num_tokens:
                needs_logits.append(i)
        max_blocks = max(len(s.block_table) for s in out.seqs)
        tables = torch.tensor([s.block_table + [0] * (max_blocks - len(s.block_table)) for s in out.seqs],
                              dtype=torch.long)
        positions = torch.cat([torch.arange(kv - q, kv) for q, kv in zip(q_lens, kv_lens)])
        rows = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
        slots = tables[rows, positions // bs] * bs + positions % bs  # [N] cache slot per token
        meta = AttentionMetadata(
            q_lens=q_lens, kv_lens=kv_lens, kv_cache=self.kv_cache,
            slot_mapping=slots.to(self.device), block_tables=tables.to(self.device),
        )
        return torch.tensor(ids, device=self.device), positions.to(self.device), meta, needs_logits

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput):
        """Run one step. Returns ``([(seq, token, logprobs)], [(seq, error)])``: the sequences that sampled, and
        those whose row could not be sampled (their parameters made no finite distribution)."""
        ids, positions, meta, rows = self.prepare(out)
        hidden = self.model(ids, positions, meta, logits_seq_ids=rows, fused=self.fused, swiftkv=self.swiftkv)
        if not rows:
            return [], []
        logits = self.model.compute_logits(hidden)
        seqs: list[Sequence] = [out.seqs[r] for r in rows]
        self._mask_stops_before_min_tokens(logits, seqs)
        if any(s.params.has_penalties for s in seqs):
            logits = logits.float()
            apply_penalties(logits, [s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                            [s.output_token_ids for s in seqs])
        tokens, logprobs, errors = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs])
        return ([(s, t, lp) for r, (s, t, lp) in enumerate(zip(seqs, tokens, logprobs)) if r not in errors],
                [(seqs[r], why) for r, why in errors.items()])

    def _mask_stops_before_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Before a sequence has ``min_tokens`` outputs, its stop tokens (eos unless ``ignore_eos``,
        and ``stop_token_ids``) cannot be sampled (vLLM's rule)."""
        for r, seq in enumerate(seqs):
            p = seq.params
            if len(seq.output_token_ids) < p.min_tokens:
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
                ids = [t for t in stops if 0 <= t < logits.shape[-1]]
                if ids:
                    logits[r, ids] = float("-inf")
