"""Benchmarks: throughput and latency of tokenmill against peers measured in the same run."""
