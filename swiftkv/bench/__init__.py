"""Benchmarks (not tests): prefill and decode throughput, side by side, interleaved."""
