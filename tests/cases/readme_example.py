"""The README's "Adding a method" example, executed from README.md itself and run through the invariant matrix
on every family (so the documented example stays a working method)."""

import re
from pathlib import Path

from matrix import MethodCase

_README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
_SECTION = _README[_README.index("### Adding a method"):]
EXAMPLE = re.search(r"```python\n(.*?)```", _SECTION, re.S).group(1)
exec(compile(EXAMPLE, "README.md (Adding a method)", "exec"), {"__name__": "readme_example"})

CASES = [
    MethodCase("readme-hidden-norm", side="llm", reduce={"method": "hidden-norm", "layer": 2, "budget": 0.5},
               identity={"method": "hidden-norm", "layer": 2, "budget": 1.0}, expected=lambda n: n // 2),
]
