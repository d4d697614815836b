"""Weights in the form they are held for inference, and how that form is chosen.

A checkpoint's weight is held once, in the fewest bytes that reproduce it *bit for bit* and that the
kernels (:mod:`swiftkv.kernels.linear`) read:

- ``q4``: values dequantized from GGUF Q4_1 (``scale * q + offset`` per block of 32 inputs, ``q`` in
  0..15, fp16 scale and offset): 4-bit codes, 0.625 bytes per weight, as llama.cpp holds them;
- ``q8``: the same with 8-bit codes (Q8_0 values, or Q4_1 blocks with fp32 offsets): 1.25 bytes;
- ``bf16``: bf16 values (checkpoints stored in bf16, most on the hub, and swiftkv's distilled tensors):
  2 bytes, the file's own bytes when the checkpoint is bf16 (memory-mapped; the whole 2 MB pages of them then
  moved onto huge pages at the same addresses, :func:`swiftkv.memory.back_with_huge_pages`);
- ``f32``: anything else in an fp32 checkpoint computed in fp32: 4 bytes.

Compact forms are looked for only in fp32 weights (where they save bytes); an fp32 weight with none is
converted to bf16 when the model computes in bf16 (what ``.to(bfloat16)`` did), and kept otherwise.
Without the kernels (no AVX2, no compiler, ``SWIFTKV_COMPACT_WEIGHTS=0``) every weight is held densely
in the compute dtype, as PyTorch's own matmuls need it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swiftkv.kernels import linear as kernels

BLOCK = 32
_CHUNK_ROWS = 4096  # form detection works through a large weight in row chunks (bounded temporaries)


@dataclass
class HeldWeight:
    """A weight ``[out_features, in_features]`` in its held form (see the module docstring)."""

    kind: str  # "q4", "q8", "bf16" or "f32"
    data: torch.Tensor  # q4: uint8 [O, I/2]; q8: uint8 [O, I]; bf16 / f32: the values [O, I]
    in_features: int
    scale: torch.Tensor | None = None  # q4: float16 [O, I/32]; q8: float32 [O, I/32]
    offset: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.offset) if t is not None)

    @property
    def is_dense(self) -> bool:
        """Values as they are (``bf16`` / ``f32``), not codes."""
        return self.kind in ("bf16", "f32")

    def c_weight(self, bias: torch.Tensor | None = None) -> kernels.CWeight:
        """The kernels' view (the tensors must outlive it)."""
        return kernels.c_weight(self.kind, self.data, self.scale, self.offset, bias, self.in_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` as float32 ``[len(ids), in_features]`` (an embedding lookup), exactly."""
        if self.is_dense:
            return self.data.index_select(0, ids).float()
        n, nb = ids.numel(), self.in_features // BLOCK
        codes = self.data.index_select(0, ids)
        if self.kind == "q4":  # byte j of a block: code j in the low nibble, code 16 + j in the high one
            packed = codes.view(n, nb, 16)
            codes = torch.cat([packed & 0x0F, packed >> 4], -1)  # [n, blocks, 32]
        scale = self.scale.index_select(0, ids).float()[..., None]  # [n, blocks, 1]
        offset = self.offset.index_select(0, ids).float()[..., None]
        return (codes.view(n, nb, BLOCK).float() * scale + offset).view(n, self.in_features)

    def dense(self) -> torch.Tensor:
        """The whole weight as float32 (bf16 for ``bf16``): a reference, and for code that needs it whole."""
        if self.is_dense:
            return self.data
        return self.rows(torch.arange(self.out_features))


def hold(weight: torch.Tensor, dtype: torch.dtype) -> HeldWeight:
    """The form to hold ``weight`` (a checkpoint tensor, possibly memory-mapped) in for a model computing in
    ``dtype``; ``weight`` itself is reused (not copied) where it is already in that form."""
    weight = weight.detach()
    if weight.device.type != "cpu" or weight.dim() != 2 or kernels.library() is None or weight.shape[1] % 8:
        return HeldWeight(_dense_kind(dtype), weight.to(dtype).contiguous(), weight.shape[1])
    if weight.dtype == torch.float32:
        compact = find_compact_form(weight)
        if compact is not None:
            return compact
    if weight.dtype == torch.bfloat16 or (weight.dtype == torch.float32 and dtype == torch.float32):
        return HeldWeight(_dense_kind(weight.dtype), weight.contiguous(), weight.shape[1])
    return HeldWeight(_dense_kind(dtype), weight.to(dtype).contiguous(), weight.shape[1])


def _dense_kind(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.bfloat16: "bf16"}.get(dtype, "dense")


def find_compact_form(weight: torch.Tensor) -> HeldWeight | None:
    """The narrowest exact compact form (``q4``, ``q8``, ``bf16``) of a float32 CPU ``weight [O, I]``, or
    None if it has none. A small sample is tried first, so most weights without one cost little."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % 8:
        return None
    for finder in (_to_q4, _to_q8, _to_bf16):
        if finder(weight[:4]) is None:
            continue
        parts = [finder(weight[i : i + _CHUNK_ROWS]) for i in range(0, weight.shape[0], _CHUNK_ROWS)]
        if all(p is not None for p in parts):
            return parts[0] if len(parts) == 1 else _cat(parts)
    return None


def _cat(parts: list[HeldWeight]) -> HeldWeight:
    cat = (lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts]))
    return HeldWeight(parts[0].kind, cat("data"), parts[0].in_features, cat("scale"), cat("offset"))


def _to_bf16(weight: torch.Tensor) -> HeldWeight | None:
    as_bf16 = weight.to(torch.bfloat16)
    return HeldWeight("bf16", as_bf16.contiguous(), weight.shape[1]) if torch.equal(as_bf16.float(), weight) else None


def _blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(w [O, blocks, 32], block minimum, block maximum)``, or None where I is not a multiple of 32."""
    if weight.shape[1] % BLOCK:
        return None
    w = weight.reshape(weight.shape[0], -1, BLOCK)
    return w, w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)


def _codes(w: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of ``w`` for an fp16 ``step`` per block from the block minimum ``lo``: ``(q, scale, ok)``, ``ok``
    per block where every value is reproduced bit for bit with ``q`` in 0..top."""
    scale = step.half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant blocks: q = 0
    q = torch.round((w - lo) / scale)
    return q, scale, ((q >= 0) & (q <= top) & (q * scale + lo == w)).all(-1, keepdim=True)


def _to_q4(weight: torch.Tensor) -> HeldWeight | None:
    """GGUF Q4_1 values: per block ``scale * q + min`` with ``q`` in 0..15 and an fp16 scale and min."""
    blocks = _blocks(weight)
    if blocks is None:
        return None
    w, lo, hi = blocks
    q, scale, ok = _codes(w, lo, (hi - lo) / 15, 15)
    if not bool(ok.all()) or not torch.equal(lo.half().float(), lo):
        return None
    q = q.to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)  # [O, blocks, 16]: GGUF's nibble order
    return HeldWeight("q4", packed.reshape(weight.shape[0], -1).contiguous(), weight.shape[1],
                      scale.reshape(weight.shape[0], -1).half(), lo.reshape(weight.shape[0], -1).half())


def _to_q8(weight: torch.Tensor) -> HeldWeight | None:
    """8-bit codes from the block minimum with the fp16 step of a Q4_1 block (range / 15) or of a Q8_0 block
    (max |w| / 127), per block; one block that neither reproduces disqualifies the tensor."""
    blocks = _blocks(weight)
    if blocks is None:
        return None
    w, lo, hi = blocks
    best = None
    for step in ((hi - lo) / 15, w.abs().amax(-1, keepdim=True) / 127):  # Q4_1, Q8_0
        q, scale, ok = _codes(w, lo, step, 255)
        if best is None:
            best = q, scale, ok
        else:
            best = (torch.where(best[2], best[0], q), torch.where(best[2], best[1], scale), best[2] | ok)
        if bool(best[2].all()):
            O = weight.shape[0]
            return HeldWeight("q8", best[0].to(torch.uint8).reshape(O, -1).contiguous(), weight.shape[1],
                              best[1].reshape(O, -1).contiguous(), lo.reshape(O, -1).contiguous())
    return None
