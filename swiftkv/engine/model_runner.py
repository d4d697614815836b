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
from swiftkv.kernels.switches import KernelSwitches
from swiftkv.layers.attention import AttentionMetadata
from swiftkv.layers.fused_decode import FusedDecoder
from swiftkv.layers.paged_attention import PagedAttention
from swiftkv.layers.sampler import Sampler, SamplingMetadata
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
    """Owns the step for one model prepared for inference
    (:meth:`~swiftkv.models.llama.SwiftKVCausalLM.prepare_for_inference`; refused otherwise, never changed here):
    packs the scheduled work flat, builds the step's frozen metadata, picks the layer executor once per step
    (the fused decoder when every query is one token and it takes the step, else the model's eager layers), runs
    the model over its paged KV cache and hands the logits to the sampler."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, swiftkv: bool,
                 eos_token_ids: set[int] | None = None) -> None:
        if model.inference_dtype is None:
            raise ValueError("the model is not prepared for inference: call model.prepare_for_inference() first "
                             "(or load it with swiftkv.models.loader.load_model(..., for_inference=True))")
        self.model, self.swiftkv = model, swiftkv
        self.block_size = block_size
        cfg = model.config
        self.device, self.dtype = model.compute_device, model.compute_dtype
        self.skv = model.layout(swiftkv)
        self.switches = KernelSwitches.from_env()  # read once: a step never asks the environment
        # [owners, K/V, kv_heads, blocks, block_size, head_dim], allocated once
        self.kv_cache = _zeros((self.skv.num_kv_owners, 2, cfg.num_key_value_heads, num_blocks, block_size,
                                head_dim_of(cfg)), self.dtype, self.device)
        self.attn = PagedAttention(self.kv_cache, self.switches)
        fused = FusedDecoder.build(model.fused_decode_spec(), self.switches)
        self.fused = fused if fused is not None and fused.runs(self.skv, self.kv_cache) else None
        self.sampler = Sampler()
        self.eos_token_ids = frozenset(eos_token_ids or ())  # blocked before min_tokens unless ignore_eos

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.model.config, self.skv, self.dtype)

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[Sequence]]:
        """Flat token ids, positions, the step's attention metadata (with the rows that need logits), and the
        sequences that sample, in the order of those rows.

        A sequence verifying draft tokens becomes one attention row per token (its pending token, then each draft),
        each a query over the sequence's blocks up to its own position: every row needs logits, and a step of
        decodes and verifications stays one query per row, which the decode kernels and the fused layers take."""
        bs = self.block_size
        ids: list[int] = []
        q_lens, kv_lens, tables, needs_logits, sampling = [], [], [], [], []
        for seq, n in zip(out.seqs, out.num_tokens):
            c, drafts = seq.num_computed_tokens, seq.spec_token_ids
            if drafts:  # its pending token and the drafts: n rows of one query each
                ids.extend((seq.token_ids[c:] + drafts)[:n])  # c: its pending token's position
                needs_logits.extend(range(len(q_lens), len(q_lens) + n))
                q_lens.extend([1] * n)
                kv_lens.extend(range(c + 1, c + n + 1))
                tables.extend([seq.block_table] * n)
                sampling.append(seq)
                continue
            ids.extend(seq.token_ids[c : c + n])
            if c + n == seq.num_tokens:
                needs_logits.append(len(q_lens))
                sampling.append(seq)
            q_lens.append(n)
            kv_lens.append(c + n)
            tables.append(seq.block_table)
        max_blocks = max(map(len, tables))
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.long)
        positions = torch.cat([torch.arange(kv - q, kv) for q, kv in zip(q_lens, kv_lens)])
        rows = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
        slots = tables[rows, positions // bs] * bs + positions % bs  # [N] cache slot per token
        meta = AttentionMetadata(q_lens=q_lens, kv_lens=kv_lens, slot_mapping=slots.to(self.device),
                                 block_tables=tables.to(self.device), logits_seq_ids=needs_logits)
        return torch.tensor(ids, device=self.device), positions.to(self.device), meta, sampling

    def sampling_metadata(self, seqs: list[Sequence]) -> SamplingMetadata:
        """The sampler's view of the sequences that sample this step: one row per sequence, and one more per draft
        token (row ``j`` sees drafts ``[:j]`` as outputs)."""
        rows = []
        for s in seqs:
            out = s.output_token_ids  # a copy already: row j extends it by drafts[:j]
            rows += [(s, out)] + [(s, out + s.spec_token_ids[:j]) for j in range(1, len(s.spec_token_ids) + 1)]
        return SamplingMetadata([s.params for s, _ in rows], [s.generator for s, _ in rows],
                                [s.prompt_token_ids for s, _ in rows], [out for _, out in rows],
                                # stop ids cannot be sampled before min_tokens (vLLM's rule)
                                [s.params.stop_ids(self.eos_token_ids) if len(out) < s.params.min_tokens
                                 else frozenset() for s, out in rows],
                                [s.spec_token_ids for s in seqs] if any(s.spec_token_ids for s in seqs) else None)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput):
        """Run one step. Returns ``([(seq, tokens, logprobs)], [(seq, error)])``: the sequences that sampled (their
        accepted draft tokens, then the one the model chose), and those whose row could not be sampled (their
        parameters made no finite distribution)."""
        ids, positions, meta, seqs = self.prepare(out)
        fused = self.fused is not None and self.fused.takes(meta, len(ids))
        hidden = self.model(ids, positions, meta, self.attn, swiftkv=self.swiftkv,
                            executor=self.fused if fused else None)
        if not seqs:
            return [], []
        sampled = self.sampler(self.model.compute_logits(hidden), self.sampling_metadata(seqs))
        errors = sampled.errors
        return ([(s, t, lp) for i, (s, t, lp) in enumerate(zip(seqs, sampled.tokens, sampled.logprobs))
                 if i not in errors], [(seqs[i], why) for i, why in errors.items()])
