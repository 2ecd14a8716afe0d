"""The docs: the config reference is current, the Python blocks run, every public name has
an API entry with its docstring, and the README's links point at pages that exist.

Every fenced ```python block in docs/ runs (each page's blocks in order, in one namespace,
in a temporary directory); show code that must not run as an indented block or ```text.
"""

import html
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def _python_blocks(path: Path) -> str:
    return "\n".join(PYTHON_BLOCK.findall(path.read_text()))


def _run(code: str, name: str, namespace: dict) -> dict:
    exec(compile(code, name, "exec"), namespace)  # noqa: S102 -- running the docs' code is the test
    return namespace


def test_config_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_config", DOCS / "gen_config_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (DOCS / "config.md").read_text() == gen.render(), (
        "docs/config.md differs from sqjax.config.default_config(): run "
        "python docs/gen_config_reference.py and commit docs/config.md"
    )


def test_config_reference_lists_every_key():
    from sqjax.config import default_config

    def keys(d, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from keys(v, prefix + k + ".")

    page = (DOCS / "config.md").read_text()

    def listed(key):  # a top-level group is a section, every other key a row
        return f"| `{key}` |" in page or ("." not in key and f"## `{key}`" in page)

    missing = [k for k in keys(default_config().to_dict()) if not listed(k)]
    assert not missing, f"docs/config.md lacks {missing}"
    # one row by hand: the default and the comment of config.py's line
    assert "| `train.batch_size` | `128` | global; split over devices |" in page
    assert "| `eval.bootstrap.unit` | `'speaker'` |" in page


OTHER_PAGES = sorted(
    p for p in DOCS.rglob("*.md") if p.name != "quantizer.md" and PYTHON_BLOCK.search(p.read_text())
)


@pytest.mark.parametrize("page", OTHER_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run(_python_blocks(page), str(page), {"__name__": "__docs__"})


def test_quantizer_page_and_readme_example_run(tmp_path, monkeypatch):
    # The page's example is whole; the README's is the same calls on the user's params,
    # my_loss and batch: it runs with the page's.
    monkeypatch.chdir(tmp_path)
    page = DOCS / "quantizer.md"
    ns = _run(_python_blocks(page), str(page), {"__name__": "__docs__"})
    ns["batch"] = (ns["x"], ns["y"])
    readme = _python_blocks(README)
    assert "sqjax.kmeans_quantizer(rules)" in readme
    _run(readme, str(README), ns)
    assert (tmp_path / "model.npz").is_file()
    import jax
    import numpy as np

    expected = jax.jit(ns["quantizer"].apply)(ns["params"], ns["qstate"])
    for a, b in zip(jax.tree.leaves(ns["qparams"]), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_readme_is_short_and_links_exist():
    text = README.read_text()
    assert len(text.splitlines()) <= 250, "README.md: at most 250 lines; move detail to docs/"
    links = re.findall(r"\]\(((?:docs/)[^)#]*)", text)
    assert links, "README.md links to no docs page"
    missing = sorted({link for link in links if not (ROOT / link).exists()})
    assert not missing, f"README.md links to missing files: {missing}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason='the docs extra: pip install -e ".[docs]"')
    pytest.importorskip("mkdocstrings_handlers.python")
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        check=False,  # the assert below shows the build's output
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    return out


def _text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", fragment)).split())


def test_every_public_name_has_an_api_entry(site):
    """Each name of sqjax.__all__ has an entry (an anchor) on an API page; a function or
    class (not another name for one) with its signature and its docstring's first line. A
    new public name needs a docstring, and its module a page in docs/api/ and mkdocs.yml."""
    import sqjax

    pages = {p: p.read_text() for p in (site / "api").rglob("index.html")}
    missing, undocumented = [], []
    for name in sqjax.__all__:
        obj = getattr(sqjax, name)
        anchors = {f"{sqjax._EXPORTS[name]}.{name}"}
        if getattr(obj, "__module__", None):
            anchors.add(f"{obj.__module__}.{name}")
        found = [
            (t, t.index(f'id="{a}"')) for a in anchors for t in pages.values() if f'id="{a}"' in t
        ]
        if not found:
            missing.append(name)
            continue
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__name__ == name:
            t, i = found[0]
            start = t.index(">", i)
            entry = _text(t[start : t.find('class="doc doc-heading"', start)])
            summary = " ".join(inspect.getdoc(obj).splitlines()[0].replace("``", "").split())
            if summary not in entry or (inspect.isfunction(obj) and f"{name}(" not in entry):
                undocumented.append(name)
    assert not missing, (
        f"no API entry for {missing}: add their module to docs/api/ (and mkdocs.yml)"
    )
    assert not undocumented, f"API entries without signature or docstring: {undocumented}"
