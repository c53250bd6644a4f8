import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(__file__)))  # the repository root: tests import eval/
torch.set_num_threads(1)  # tiny models: threads only add overhead; pytest -n 2 uses both cores
