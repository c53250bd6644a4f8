"""VQA-benchmark evaluation of compressed VLMs: ``vtc eval`` and the lmms-eval plugin.

- :mod:`vtc.evaluation.metrics`: VQA accuracy (official normalisation, 10-choose-9 average), GQA exact match,
  POPE accuracy / precision / recall / F1 / yes-ratio.
- :mod:`vtc.evaluation.datasets`: readers for the published local files of VQAv2, TextVQA, GQA, POPE and the
  synthetic shapes-VQA task.
- :mod:`vtc.evaluation.custom`: ``--task custom``, your own questions in a JSONL / CSV file.
- :mod:`vtc.evaluation.runner`: one run: methods interleaved batch by batch, resumable, data parallel, on top of
  :mod:`.generation` (:class:`BatchAnswerer`), :mod:`.cache` (the prediction cache), :mod:`.distributed`,
  :mod:`.scoring` and :mod:`.confidence` (bootstrap intervals), :mod:`.report` and :mod:`.plot`.
- :mod:`vtc.evaluation.cli`: ``vtc eval`` (``main(argv)``).
- :mod:`vtc.evaluation.plugin_lmms`: the ``vtc`` model for lmms-eval (entry point group ``lmms_eval.models``).

Python use::

    from vtc.evaluation import EvalOptions, run_eval
    report = run_eval(EvalOptions(task="pope", model="llava-hf/llava-1.5-7b-hf", data="data/pope",
                                  configs=["llava-1.5/visionzip-64"], compare=True))
"""

from .datasets import TASKS, DatasetError, EvalSample, load_task
from .runner import BatchAnswerer, EvalError, EvalOptions, load_vlm, predict, run_eval, score, summarize

__all__ = ["TASKS", "DatasetError", "EvalError", "EvalOptions", "EvalSample", "BatchAnswerer", "load_task",
           "load_vlm", "predict", "run_eval", "score", "summarize"]
