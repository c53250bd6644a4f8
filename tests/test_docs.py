"""Every built-in method has its docs page: ``docs/methods/<name>.md`` exists, the module docstring links it, the
README's method table row links it, and every page linked from the README exists. Module docstrings stay concise
(what, where it hooks, the formula, the defaults, the paper); the long derivations and official-code quirks live
in the page."""

import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

import vtc
from vtc.methods import get_method_class

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "docs" / "methods"
#: the longest a method module's docstring may be (the longest today: cdpruner's 30 lines)
MAX_DOCSTRING_LINES = 30
ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})")


def _builtin_methods() -> dict[str, ModuleType]:
    """Registered name -> module, for the methods that ship in ``vtc/methods/`` (not ones a test registers)."""
    out = {}
    for name in vtc.available_methods():
        cls = get_method_class(name)
        if cls.__module__.startswith("vtc.methods."):
            out[name] = sys.modules[cls.__module__]
    return out


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def _readme_method_rows() -> dict[str, str]:
    """Method name -> its row of the README's method table (the "## Methods" section)."""
    section = _readme().split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([\w-]+)` \|", line)
        if m:
            assert m.group(1) not in rows, f"two README rows for {m.group(1)}"
            rows[m.group(1)] = line
    return rows


def test_every_builtin_method_has_a_page_linked_from_its_docstring():
    methods = _builtin_methods()
    assert len(methods) >= 15
    missing = sorted(n for n in methods if not (PAGES / f"{n}.md").is_file())
    unlinked = sorted(n for n, mod in methods.items() if f"docs/methods/{n}.md" not in (mod.__doc__ or ""))
    assert missing == [], f"no docs/methods/<name>.md for {missing}"
    assert unlinked == [], f"module docstrings that do not link docs/methods/<name>.md: {unlinked}"


def test_every_page_belongs_to_a_method_and_names_its_file():
    """No stale page for a method that is gone; each page says which file implements it."""
    methods = _builtin_methods()
    pages = sorted(p.stem for p in PAGES.glob("*.md"))
    assert sorted(set(pages) - set(methods)) == []
    for name, mod in methods.items():
        text = (PAGES / f"{name}.md").read_text(encoding="utf-8")
        assert text.startswith("# "), name
        assert f"vtc/methods/{Path(mod.__file__).name}" in text, name


def test_readme_method_table_links_every_page():
    methods = _builtin_methods()
    rows = _readme_method_rows()
    assert sorted(rows) == sorted(methods), "the README method table and the registered methods differ"
    unlinked = sorted(n for n, row in rows.items() if f"](docs/methods/{n}.md)" not in row)
    assert unlinked == [], f"README rows without a link to their docs page: {unlinked}"


def test_every_method_page_the_readme_links_exists():
    links = re.findall(r"docs/methods/[\w-]+\.md", _readme())
    assert len(set(links)) >= 15
    assert sorted({p for p in links if not (ROOT / p).is_file()}) == []


def test_method_docstrings_are_concise_and_cite_what_the_page_cites():
    """A short docstring (at most MAX_DOCSTRING_LINES lines) whose arXiv ids the page repeats."""
    too_long, uncited = {}, {}
    for name, mod in _builtin_methods().items():
        doc = inspect.cleandoc(mod.__doc__ or "")
        if len(doc.splitlines()) > MAX_DOCSTRING_LINES:
            too_long[name] = len(doc.splitlines())
        page_ids = set(ARXIV.findall((PAGES / f"{name}.md").read_text(encoding="utf-8")))
        if set(ARXIV.findall(doc)) - page_ids:
            uncited[name] = sorted(set(ARXIV.findall(doc)) - page_ids)
    assert too_long == {}, f"module docstrings over {MAX_DOCSTRING_LINES} lines (move the long text to the page)"
    assert uncited == {}, f"arXiv ids in a docstring but not in its page: {uncited}"
