"""The notebooks in colabs/: committed without outputs, and each runs with ``QUICK = True`` on a CPU
and draws every figure.

A notebook runs in a Jupyter kernel of this Python (nbclient), from the repository root (as in
Colab after its setup cell), with the papermill convention for parameters: a cell injected after
the cell tagged ``parameters`` sets ``QUICK = True`` and, where the notebook has one, ``WORKDIR``
to a temporary directory. Cells tagged ``figure`` must each display a PNG.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from tests.train_helpers import COMPILE_CACHE_ENV, XLA_TEST_FLAGS

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "colabs").glob("*.ipynb"))
REPO_URL = "https://github.com/aacn-jax/aacn_jax"
KERNEL = "python3"


def colab_url(path: pathlib.Path) -> str:
    return f"https://colab.research.google.com/github/aacn-jax/aacn_jax/blob/main/colabs/{path.name}"


def tagged(nb, tag: str) -> list:
    return [cell for cell in nb.cells if tag in cell.metadata.get("tags", [])]


def test_the_three_notebooks_are_there():
    assert [path.name for path in NOTEBOOKS] == [
        "attention_maps.ipynb",
        "library_tour.ipynb",
        "quickstart.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_without_outputs_with_parameters_badge_and_figures(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"outputs left in {path.name}"
    (parameters,) = tagged(nb, "parameters")
    assert re.search(r"^QUICK = False\b", parameters.source, re.MULTILINE)
    assert colab_url(path) in nb.cells[0].source  # the "Open in Colab" badge
    assert f'REPO_URL = "{REPO_URL}"' in "".join(cell.source for cell in nb.cells)
    assert len(tagged(nb, "figure")) >= 1
    assert nb.metadata.kernelspec.name == KERNEL


def test_readme_links_every_notebook_with_a_badge():
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"]({colab_url(path)})" in readme


def test_kernel_is_this_python():
    command = KernelManager(kernel_name=KERNEL).format_kernel_cmd()
    assert os.path.realpath(shutil.which(command[0]) or command[0]) == os.path.realpath(sys.executable)


def kernel_env() -> dict[str, str]:
    """One CPU device (not the test session's four), the test compile cache, the inline backend."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MPLBACKEND", "PYTHONPATH")}
    env.update(XLA_FLAGS=XLA_TEST_FLAGS, JAX_PLATFORMS="cpu", **COMPILE_CACHE_ENV)
    return env


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_quick_run_draws_every_figure(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    (parameters,) = tagged(nb, "parameters")
    injected = "QUICK = True"
    if re.search(r"^WORKDIR = ", parameters.source, re.MULTILINE):
        injected += f"\nWORKDIR = {str(tmp_path / 'workdir')!r}"
    cell = nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(nb.cells.index(parameters) + 1, cell)

    NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(REPO)}}).execute(
        env=kernel_env()
    )

    figures = tagged(nb, "figure")
    for cell in figures:
        images = [
            out for out in cell.outputs if out.output_type == "display_data" and "image/png" in out.data
        ]
        assert len(images) == 1, f"a figure cell of {path.name} displayed {len(images)} PNGs:\n{cell.source}"
