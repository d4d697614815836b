"""Benchmark arithmetic and rendering (benchmarks themselves live apart from tests)."""

from __future__ import annotations

from transformers import LlamaConfig

from swiftkv.bench.flops import decode_flops, layer_flops, prefill_flops
from swiftkv.bench.offline import Workload, summarise
from swiftkv.bench.report import format_table, ratio_lines
from swiftkv.config import SwiftKVConfig

CFG = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=4,
                  intermediate_size=16, vocab_size=10)  # head_dim 4


def test_layer_and_decode_flops_by_hand():
    # projections: q 8*8 + k,v 2*8*4 + o 8*8 + mlp 3*8*16 = 64 + 64 + 64 + 384 = 576 MACs
    assert layer_flops(CFG, 0) == 2 * 576
    assert layer_flops(CFG, 5) == 2 * 576 + 4 * 2 * 4 * 5  # QK^T and PV over 5 keys, 2 heads of dim 4
    assert decode_flops(CFG, 5) == 4 * layer_flops(CFG, 5) + 2 * 8 * 10


def test_prefill_flops_baseline_and_swiftkv():
    n = 6
    base = sum(4 * layer_flops(CFG, p + 1) for p in range(n)) + 2 * 8 * 10
    assert prefill_flops(CFG, SwiftKVConfig(4, 4), n, swiftkv=False) == base
    skv = SwiftKVConfig(4, 2, 2)  # l=2, one AcrossKV group of 2 later layers -> one leader
    kv = 2 * 2 * 8 * 4  # one token's K+V projections for one leader
    expected = (sum(2 * layer_flops(CFG, p + 1) for p in range(n)) + n * kv
                + 2 * (layer_flops(CFG, n) - kv) + 2 * 8 * 10)
    assert prefill_flops(CFG, skv, n, swiftkv=True) == expected
    assert prefill_flops(CFG, skv, n, swiftkv=True) < base


def test_summarise_mfu_and_rates():
    w = Workload("custom", [[1] * 10, [1] * 30], 5)
    raw = [{"wall_s": 2.0, "ttft": [0.5, 1.0], "tpot": [0.1, 0.2]}, {"wall_s": 4.0, "ttft": [1, 2], "tpot": [1, 1]}]
    s = summarise(raw, w, flops=6e9, peak=1e10)
    assert s["wall_s"] == 3.0  # median of reps
    assert s["total_tokens_per_s"] == (40 + 10) / 3.0
    assert s["gflops_per_s"] == 2.0 and abs(s["mfu"] - 0.2) < 1e-12


def test_table_rendering():
    systems = {"swiftkv": {"total_tokens_per_s": 1500.4, "mfu": 0.123, "ttft_p50_s": 0.25},
               "transformers": {"total_tokens_per_s": 500.0}}
    table = format_table(systems).splitlines()
    assert table[0].split()[:3] == ["system", "tok/s", "req/s"]
    assert table[1].split()[0:2] == ["swiftkv", "1500"] and "12.3%" in table[1] and "0.25s" in table[1]
    assert table[2].split()[1] == "500" and table[2].count("-") >= 8
    assert ratio_lines(systems) == ["swiftkv/transformers total_tokens_per_s: 3.00x"]
