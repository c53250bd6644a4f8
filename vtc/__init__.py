"""vtc: visual token compression for Hugging Face vision-language models.

```python
import vtc
with vtc.compress(model, "configs/llava-1.5/fastv-50.yaml") as run:
    out = model.generate(**inputs, max_new_tokens=32)
print(run.stats)
```
"""

from __future__ import annotations

from .config import Config, load_config
from .errors import ConfigError
from .functional import reduce_embeddings
from .layout import Grid, Layout, MultiCrop, Sequence, Video
from .methods import Method, available_methods, register_method
from .models import ModelAdapter, register_adapter, supported_models
from .reduction import Reduction
from .runtime import Run, apply, compress

__version__ = "0.1.0"

__all__ = [
    "compress",
    "apply",
    "Run",
    "reduce_embeddings",
    "load_config",
    "Config",
    "ConfigError",
    "available_methods",
    "register_method",
    "register_adapter",
    "supported_models",
    "Method",
    "ModelAdapter",
    "Reduction",
    "Layout",
    "Grid",
    "Video",
    "Sequence",
    "MultiCrop",
    "__version__",
]

