"""Serving engines that run vtc's vision-side methods: :mod:`vtc.serving.vllm` (a ``vllm.general_plugins`` plugin).

Nothing here is imported by ``import vtc``; the plugin module imports vLLM only when vLLM loads it.
"""
