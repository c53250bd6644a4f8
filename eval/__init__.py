"""Benchmarks and evaluation scripts of vtc (not part of the installed package)."""
