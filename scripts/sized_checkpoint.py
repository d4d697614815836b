#!/usr/bin/env python3
"""Write a size-shaped checkpoint with random bf16 weights -- for speed and memory measurements only.

    scripts/sized_checkpoint.py llama-3.2-1b --out DIR       (shapes: llama-3.2-1b, llama-3.2-3b,
                                                             qwen2.5-1.5b, llama-3.1-8b)

`swiftkv bench sized:llama-3.2-1b-swiftkv ...` builds the same into the cache by itself (and its 50%
SwiftKV conversion); see swiftkv/sized.py.
"""

import argparse

from swiftkv.builtin import default_model_dir
from swiftkv.sized import SHAPES, write_sized_checkpoint

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("name", choices=list(SHAPES))
p.add_argument("--out", required=True)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--max-shard-size", default="5GB")
args = p.parse_args()
print(f"wrote {write_sized_checkpoint(args.name, args.out, default_model_dir(), args.seed, args.max_shard_size)} (random weights: "
      "for speed and memory measurements only)")
