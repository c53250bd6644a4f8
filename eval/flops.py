"""Analytic FLOPs and KV-cache bytes: moved into the package as :mod:`vtc.flops` (one implementation, used by
``vtc eval`` and the benchmark); this module re-exports it so ``eval/`` scripts keep working."""

from vtc.flops import *  # noqa: F401,F403
from vtc.flops import __all__  # noqa: F401
