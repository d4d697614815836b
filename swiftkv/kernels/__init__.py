"""swiftkv's C kernels for the CPU: sources in ``csrc/`` (one header per kernel, names prefixed ``skv_``,
no ``.c`` file including another), built once into one shared library by :mod:`swiftkv.kernels.build`,
and thin Python bindings, tensors in and tensors out, that know nothing of models:

- :mod:`~swiftkv.kernels.linear`: matmuls over weights in their held form (decode gemv, batched-decode
  panel GEMM, widening for prefill GEMMs), see :mod:`swiftkv.layers.weights` for the forms;
- :mod:`~swiftkv.kernels.elementwise`: RMSNorm, SiLU-and-mul, rotary in place;
- :mod:`~swiftkv.kernels.paged_attention`: decode attention read in place from the paged KV cache;
- :mod:`~swiftkv.kernels.fused_decode`: a decode step's layers in one call (structs mirrored here).

AVX2 + FMA + F16C with OpenMP. Where they cannot run (no such CPU, no C compiler, a failed build) the
library is None, said once on stderr, and every caller keeps its PyTorch path.
"""
