"""Every ``colab/*.ipynb`` runs top to bottom on CPU, in the venv's own interpreter.

Notebooks are stored without outputs and executed with nbclient in a fresh kernel.  The
kernel is the interpreter running pytest: a ``python3`` kernelspec pointing at
``sys.executable`` is written to a temporary folder and resolved from there only, so a
``python3`` spec elsewhere (``~/.local/share/jupyter``, a system Jupyter) cannot hijack it.
The kernel runs on CPU with ``jax_debug_key_reuse`` on, like the rest of the suite.
Notebook-specific checks (``CHECKS``) run only for the notebook they name; a new
``colab/*.ipynb`` is picked up by the glob and must at least run without error.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import nbclient
import nbformat
import pytest
from ipykernel import kernelspec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

COLAB = pathlib.Path(__file__).resolve().parents[2] / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
KERNEL_NAME = "python3"
# Appended to the executed copy (never to the file): report what the kernel ran in.
PROBE = "import json as _j, sys as _s\nprint('@@KERNEL@@' + _j.dumps({'prefix': _s.prefix}))"


@pytest.fixture(scope="session")
def kernel_dirs(tmp_path_factory) -> list[str]:
    """A folder holding one ``python3`` kernelspec whose argv is this interpreter."""
    root = tmp_path_factory.mktemp("kernels")
    kernelspec.write_kernel_spec(path=root / KERNEL_NAME)
    spec = KernelSpecManager(kernel_dirs=[str(root)]).get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable, spec.argv
    return [str(root)]


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def marked_json(nb, marker: str) -> dict:
    for cell in nb.cells:
        for line in stream_text(cell).splitlines():
            if line.startswith(marker):
                return json.loads(line[len(marker):])
    raise AssertionError(f"no line starting with {marker!r} in the notebook's output")


def execute(path: pathlib.Path, kernel_dirs: list[str], extra_cells: list[str]):
    nb = nbformat.read(path, as_version=4)
    for source in extra_cells:
        nb.cells.append(nbformat.v4.new_code_cell(source))
    km = AsyncKernelManager(
        kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs)
    )
    client = nbclient.NotebookClient(
        nb, km=km, timeout=600, kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(path.parent)}},
    )
    # CPU only, and key reuse is an error, as in tests/conftest.py.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEBUG_KEY_REUSE="true")
    client.execute(env=env)  # raises CellExecutionError on the first failing cell
    return nb


def check_shuffling(nb) -> None:
    slopes = marked_json(nb, "@@SLOPES@@")
    assert set(slopes) >= {"with_replacement", "random_reshuffle", "grab_pair_balance"}
    assert -1.5 < slopes["with_replacement"]["epochs"] < -0.5, slopes
    assert slopes["random_reshuffle"]["epochs"] < -1.5, slopes
    table = "".join(stream_text(c) for c in nb.cells)
    assert "K slope" in table and "with_replacement" in table
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the log-log plot was not displayed"


def check_error_feedback(nb) -> None:
    summary = marked_json(nb, "@@EF@@")
    # 1. Beznosikov et al. (2020), Example 1: Top-1 GD grows at the predicted rate, EF converges.
    counter = summary["counterexample"]
    norms = counter["relative_final_norm"]
    assert norms["compressed GD, Top-1"] > 1e3, norms
    assert norms["EF14, Top-1"] < 1e-3 and norms["EF21, Top-1"] < 1e-3, norms
    growth = counter["growth"]
    assert abs(growth["measured"] - growth["predicted"]) < 1e-6 * growth["predicted"], growth
    # 2. L_AM vs L_QM: equal workers need about the same bits, unequal ones fewer with L_AM;
    # EF21-W with Top-k is EF21 with the L_AM step.
    bits = summary["bits_to_tolerance"]
    for spread in ("1.0", "1000.0"):
        assert all(v is not None for k, v in bits[spread].items() if k.startswith("EF21")), bits
    same = bits["1.0"]
    assert abs(same["EF21, γ from L_AM"] - same["EF21, γ from L_QM"]) < 0.05 * same["EF21, γ from L_QM"], same
    spread = bits["1000.0"]
    assert spread["EF21, γ from L_AM"] < 0.75 * spread["EF21, γ from L_QM"], spread
    assert summary["ef21_w_vs_ef21_am_gap"] < 1e-9, summary["ef21_w_vs_ef21_am_gap"]
    # 3. Documented alpha: a lower bound attained by the worst-case vector; Rand-k's is exact.
    alpha = summary["alpha"]
    for name in ("top_k", "scaled_sign"):
        row = alpha[name]
        assert row["min"] >= row["documented"] - 1e-12, (name, row)
        assert abs(row["worst_case_vector"] - row["documented"]) < 1e-5 * row["documented"], (name, row)
    row = alpha["rand_k_unscaled"]
    assert abs(row["mean"] - row["documented"]) < 4 * row["stderr"], row
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the three figures were not displayed"


CHECKS = {
    "shuffling.ipynb": (
        ["import json as _j\nprint('@@SLOPES@@' + _j.dumps(slopes))"],
        check_shuffling,
    ),
    "error_feedback.ipynb": (
        ["import json as _j\nprint('@@EF@@' + _j.dumps(summary))"],
        check_error_feedback,
    ),
}


def test_found_notebooks():
    assert (COLAB / "shuffling.ipynb") in NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path, kernel_dirs: list[str]):
    stored = nbformat.read(path, as_version=4)
    nbformat.validate(stored)
    for cell in stored.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name} is stored with outputs; clear them before committing"
            )
    extra, check = CHECKS.get(path.name, ([], None))
    nb = execute(path, kernel_dirs, [*extra, PROBE])
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    assert marked_json(nb, "@@KERNEL@@")["prefix"] == sys.prefix
    if check is not None:
        check(nb)
