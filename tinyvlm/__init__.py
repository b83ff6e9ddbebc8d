"""Deterministic tiny vision-language checkpoints for the default server, tests and benchmarks."""
