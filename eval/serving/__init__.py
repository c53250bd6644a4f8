"""vtc inside vLLM: environment script, tiny checkpoints and the serving benchmark (see BENCHMARKS.md)."""
