"""colab/*.ipynb: committed without outputs, in the expected shape, and each runs top to
bottom in quick mode (``SQJAX_QUICK=1``: a smaller corpus, fewer steps).

Each notebook runs in a fresh ``python3`` kernel (jupyter_client starts it with this
interpreter) whose working directory is a pytest tmp dir, so its ``sqjax_work/`` lands
there. Quick mode takes 1-2 minutes per notebook on 2 busy cores.
"""

import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = Path(__file__).parents[1] / "colab"
NOTEBOOKS = ("quickstart", "quantize_any_jax_model", "paper_analysis")
BADGE = "https://colab.research.google.com/github/sqjax/sqjax/blob/main/colab/{}.ipynb"


def _read(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    return nb


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean(name):
    nb = _read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]

    first, second = nb.cells[0], nb.cells[1]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert BADGE.format(name) in first.source
    # The install cell: pip only where sqjax is not importable (Colab), never in CI.
    assert second.cell_type == "code"
    assert 'importlib.util.find_spec("sqjax") is None' in second.source
    assert "git+https://github.com/sqjax/sqjax" in second.source

    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    assert 'QUICK = os.environ.get("SQJAX_QUICK", "0") == "1"' in params[0].source


def test_python3_kernel_is_this_interpreter():
    # Another "python3" kernelspec (a user-wide one, say) would run the notebooks elsewhere.
    km = NotebookClient(nbformat.v4.new_notebook(), kernel_name="python3").create_kernel_manager()
    exe = km.format_kernel_cmd()[0]
    assert os.path.samefile(exe, sys.executable), (
        f"the python3 kernel runs {exe}, not {sys.executable}: "
        f"run `{sys.executable} -m ipykernel install --sys-prefix`"
    )


def _kernel_env(monkeypatch):
    monkeypatch.setenv("SQJAX_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # conftest.py simulates 2 CPU devices for this process; a notebook runs as on Colab,
    # on one.
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    monkeypatch.setenv("XLA_FLAGS", flags.strip())


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_quick_mode(name, tmp_path, monkeypatch):
    _kernel_env(monkeypatch)  # the kernel inherits this process's environment
    nb = _read(name)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on an error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no inline figure"
    assert (tmp_path / "sqjax_work").is_dir()
