"""What a model holds in memory: the bytes of its tensors (each once), the weight bytes one decode step
reads, an estimate before loading (from the checkpoint's headers), and giving back the pages of
memory-mapped checkpoint tensors a prepared model no longer holds."""

from __future__ import annotations

from pathlib import Path

import torch

from swiftkv.kernels import linear as kernels
from swiftkv.memory import release_pages
from swiftkv.models.llama import LlamaForCausalLM
from swiftkv.models.shards import tensor_index, weight_files


def checkpoint_bytes(path: Path) -> int:
    """Bytes of a directory's safetensors files."""
    return sum(f.stat().st_size for f in weight_files(path))


def decode_weight_bytes(model: LlamaForCausalLM, swiftkv: bool) -> int:
    """Bytes of held weights one decode step reads (batch 1): the projections of every layer on the path
    (SingleInputKV's K/V projections instead of the later layers' own), the LM head; not the embedding
    (one row)."""
    nbytes = (lambda lin: 0 if lin is None or lin.held is None else lin.held.nbytes)
    skv = model.layout(swiftkv)
    total = nbytes(model.lm_head)
    for i, layer in enumerate(model.model.layers):
        a, mlp = layer.self_attn, layer.mlp
        total += sum(nbytes(lin) for lin in (a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        if skv.is_swiftkv_layer(i):
            total += nbytes(a.q_proj_swiftkv)
            if skv.is_group_leader(i):
                total += nbytes(a.k_proj_swiftkv) + nbytes(a.v_proj_swiftkv)
        else:
            total += nbytes(a.q_proj) + nbytes(a.k_proj) + nbytes(a.v_proj)
    return total


def held_bytes_estimate(path: Path, dtype: torch.dtype) -> int:
    """Bytes a model loaded for inference in ``dtype`` will hold, from the checkpoint's headers alone (nothing
    is read): bf16 tensors stay bf16, fp32 ones become ``dtype`` (an fp32 weight with an exact compact form
    ends up smaller: this is an upper bound), anything else ``dtype``; without the kernels, everything
    ``dtype``."""
    size = torch.empty((), dtype=dtype).element_size()
    keep = {torch.bfloat16} if kernels.library() is not None else set()
    return sum(info.nbytes if info.dtype in keep else info.nbytes // info.dtype.itemsize * size
               for info in tensor_index(weight_files(path)).values())


def release_unheld_pages(model: LlamaForCausalLM, tensors: dict[str, torch.Tensor]) -> int:
    """Give back the resident pages of memory-mapped checkpoint tensors the prepared ``model`` does not hold
    (an fp32 weight held in a compact form, a norm converted to the compute dtype): their file stays mapped
    while other tensors of it are held, but their pages no longer count against the process. Returns the
    bytes released."""
    held = {t.data_ptr() for t in model_tensors(model)}
    return sum(release_pages(t) for t in tensors.values() if t.data_ptr() not in held)


def model_tensors(model: LlamaForCausalLM) -> list[torch.Tensor]:
    """Every tensor a (possibly prepared) model holds: parameters, buffers and held weights, each once."""
    out = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    for module in model.modules():
        held = getattr(module, "held", None)
        for t in (held.data, held.scale, held.offset) if held is not None else ():
            if t is not None:
                out[t.data_ptr()] = t
    return list(out.values())


def held_bytes(model: LlamaForCausalLM) -> int:
    """Bytes of every tensor the model holds (each once: a tied LM head is its embedding)."""
    return sum(t.numel() * t.element_size() for t in model_tensors(model))
