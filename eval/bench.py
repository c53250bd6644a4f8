"""Run one ``vtc bench`` measurement from a checkout (the benchmark itself is :mod:`vtc.bench`).

    python eval/bench.py --config llava-1.5/fastv-50 --arch llava-1.5-7b --layers 3 [--repeats R] ...

Same options as ``vtc bench`` (``vtc bench --help``); ``eval/bench_all.py`` runs the whole suite.
"""

import sys

from vtc.bench import main

if __name__ == "__main__":
    sys.exit(main())
