"""The kernel switches, read from the environment once into one frozen set.

An engine reads them when it is built (:class:`~swiftkv.engine.model_runner.ModelRunner` holds its set) and
hands them to what it builds, so a step never asks the environment. Each is on by default; ``0`` switches it
off (then PyTorch's path runs):

- ``SWIFTKV_PAGED_ATTENTION``: the paged attention kernels (decode, prefill) over the cache in place;
- ``SWIFTKV_FUSED_DECODE``: a decode step's layers in one native call;
- ``SWIFTKV_BF16_DOT``: AVX512-BF16 dot products for a bf16 model's batched matmuls and its prompts' attention over
  a bf16 cache (where the CPU has them);
- ``SWIFTKV_INT8_DOT=1`` (off by default, opt-in: it costs accuracy): AVX512-VNNI dot products on int8 activations
  for a bf16 model's matmuls over Q4/Q8-held weights (where the CPU has them): decode, and prompts where the CPU has
  no AMX;
- ``SWIFTKV_PREFILL_ATTENTION=auto|kernel|sdpa|amx``: which prompt attention runs (``auto``: per CPU; ``amx``: the
  kernels' AMX flash attention for prompts without cached keys, SDPA after them -- ``auto``'s choice in bf16 where the
  tiles run).

Four more are read where their kernels are called, since models outside an engine use them too:
``SWIFTKV_CPU_OPS`` (the elementwise kernels; ``SWIFTKV_AVX512_OPS=0`` keeps them on AVX2 on a CPU with
AVX512-BF16), ``SWIFTKV_COMPACT_WEIGHTS`` (the held weight forms, read when
a model is prepared) and ``SWIFTKV_AMX_DECODE`` (on a CPU with AMX, a bf16 model's batched matmuls above
``GEMV_ROWS`` rows run on the kernels' AMX tiles, :func:`~swiftkv.kernels.linear.amx_available`, and its fresh prompts'
attention too; where those cannot run, bf16-held weights' batches go to oneDNN's tiles and the fused decoder leaves big
enough steps to them: :func:`~swiftkv.layers.linear.amx_takes_batch`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

PREFILL_ATTENTION_CHOICES = ("auto", "kernel", "sdpa", "amx")


def switched_on(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether switch ``name`` (an environment variable, on unless ``0``) is on."""
    return (os.environ if environ is None else environ).get(name, "1") != "0"


@dataclass(frozen=True)
class KernelSwitches:
    paged_attention: bool = True
    fused_decode: bool = True
    bf16_dot: bool = True
    int8_dot: bool = False
    prefill_attention: str = "auto"

    def __post_init__(self) -> None:
        if self.prefill_attention not in PREFILL_ATTENTION_CHOICES:
            raise ValueError(f"SWIFTKV_PREFILL_ATTENTION={self.prefill_attention!r}: use one of "
                             f"{', '.join(PREFILL_ATTENTION_CHOICES)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelSwitches:
        env = os.environ if environ is None else environ
        return cls(paged_attention=switched_on("SWIFTKV_PAGED_ATTENTION", env),
                   fused_decode=switched_on("SWIFTKV_FUSED_DECODE", env),
                   bf16_dot=switched_on("SWIFTKV_BF16_DOT", env),
                   int8_dot=env.get("SWIFTKV_INT8_DOT", "0") != "0",
                   prefill_attention=env.get("SWIFTKV_PREFILL_ATTENTION", "auto"))

    def prefill_kernel_preferred(self, dtype: torch.dtype) -> bool:
        """Whether prompts' attention should run the paged prefill kernel (fp32 FMAs over the cache) rather than
        PyTorch's SDPA over gathered blocks, for this CPU and compute dtype. ``auto``: SDPA for bf16 on a CPU with
        AMX, whose oneDNN flash attention runs on the tiles (measured on a Sapphire Rapids-class Xeon, bf16, default
        model: prefill @ 2,048 1.8x with SDPA: 2,689 vs 1,500 tokens/s) -- there fresh prompts take the kernels' AMX
        flash attention where it runs, ``amx`` too (:class:`~swiftkv.layers.paged_attention.PagedAttention`, which
        says the choice once on stderr); the kernel everywhere
        else (Zen 4, bf16, its AVX512-BF16 form: 2.2x SDPA per layer at 2,048 tokens; AVX2 fp32: 1.4x)."""
        from swiftkv.platforms import cpu_flags

        choice = self.prefill_attention
        if choice == "auto":
            choice = "sdpa" if dtype == torch.bfloat16 and "amx_bf16" in cpu_flags() else "kernel"
        return choice == "kernel"
