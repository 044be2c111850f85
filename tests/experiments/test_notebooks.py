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
import math
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
                return json.loads(line[len(marker) :])
    raise AssertionError(f"no line starting with {marker!r} in the notebook's output")


def execute(path: pathlib.Path, kernel_dirs: list[str], extra_cells: list[str]):
    nb = nbformat.read(path, as_version=4)
    for source in extra_cells:
        nb.cells.append(nbformat.v4.new_code_cell(source))
    km = AsyncKernelManager(
        kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs)
    )
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=600,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(path.parent)}},
    )
    # CPU only, and key reuse is an error, as in tests/conftest.py.
    # XLA's backend optimisation level 0: the notebooks compile far more than they compute,
    # and level 0 skips most LLVM passes (results stay deterministic; the checks below have
    # tolerances, none compares bits with a run at another level).
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        flags += " --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEBUG_KEY_REUSE="true", XLA_FLAGS=flags)
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
    assert (
        abs(same["EF21, γ from L_AM"] - same["EF21, γ from L_QM"])
        < 0.05 * same["EF21, γ from L_QM"]
    ), same
    spread = bits["1000.0"]
    assert spread["EF21, γ from L_AM"] < 0.75 * spread["EF21, γ from L_QM"], spread
    assert summary["ef21_w_vs_ef21_am_gap"] < 1e-9, summary["ef21_w_vs_ef21_am_gap"]
    # 3. Documented alpha: a lower bound attained by the worst-case vector; Rand-k's is exact.
    alpha = summary["alpha"]
    for name in ("top_k", "scaled_sign"):
        row = alpha[name]
        assert row["min"] >= row["documented"] - 1e-12, (name, row)
        assert abs(row["worst_case_vector"] - row["documented"]) < 1e-5 * row["documented"], (
            name,
            row,
        )
    row = alpha["rand_k_unscaled"]
    assert abs(row["mean"] - row["documented"]) < 4 * row["stderr"], row
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the three figures were not displayed"


def check_sde_solvers(nb) -> None:
    summary = marked_json(nb, "@@SDE@@")
    # 1. Exact KL (no Monte Carlo): weak order 1 gives slope -2 in NFE, Heun (order 2) -4.
    kl = summary["kl"]
    assert set(kl) >= {"euler_maruyama", "ddim", "edm_heun"}, kl
    for name in ("euler_maruyama", "ddim"):
        assert -2.8 < kl[name]["slope"] < -1.5, (name, kl[name])
    assert kl["edm_heun"]["slope"] < -3.3, kl["edm_heun"]
    assert all(b < a for row in kl.values() for a, b in zip(row["kl"], row["kl"][1:])), kl
    # 2. Mixture samples: the fine samplers sit near the Monte Carlo floor of the sliced W2
    # (about 0.1 for 1000 samples); a broken sampler lands far above it.
    mixture = summary["mixture"]
    for name, row in mixture["runs"].items():
        assert math.isfinite(row["sliced_w2"]), (name, row)
        if not name.startswith("edm_heun"):  # 8 Heun steps are visibly coarse, as the notebook says
            assert row["sliced_w2"] < mixture["floor"] + 0.15, (name, mixture)
    # 3. PF-ODE log-likelihood with the exact p_tmax equals the closed form to solver tolerance.
    ll = summary["likelihood"]
    assert ll["all_success"] and ll["max_abs_error_nats"] < 1e-4, ll
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the three figures were not displayed"


def check_mcmc(nb) -> None:
    summary = marked_json(nb, "@@MCMC@@")
    # 1. MALA and HMC at the same gradient budget: the Gaussian's mean within 5 Monte Carlo SEs
    # (s_i / sqrt(ESS_i)) in every coordinate, and a real number of effective samples.
    efficiency = summary["efficiency"]
    assert efficiency["mala"]["grads_per_chain"] == efficiency["hmc"]["grads_per_chain"], efficiency
    for name, row in efficiency.items():
        assert row["max_abs_z"] < 5.0, (name, row)
        assert row["min_ess"] > 100 and 0.3 < row["acceptance"] < 1.0, (name, row)
    # 2. SGLD: random reshuffling leaves a smaller second-moment error than with replacement,
    # separated by 4 joint standard errors.
    sgld = summary["sgld"]
    wr, rr = sgld["with_replacement"], sgld["random_reshuffle"]
    assert rr["error"] + 4 * math.hypot(rr["se"], wr["se"]) < wr["error"], sgld
    # 3. Equal gradient budgets; ULA stays in its starting mode (a quarter of the modes), walk-jump
    # visits most of them.
    tunnel = summary["tunnelling"]
    assert tunnel["ula"]["grads_per_chain"] == tunnel["walk_jump"]["grads_per_chain"], tunnel
    assert tunnel["ula"]["modes_visited"] == 0.25, tunnel
    assert tunnel["walk_jump"]["modes_visited"] - 4 * tunnel["walk_jump"]["se"] > 0.55, tunnel
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the three figures were not displayed"


def check_networks(nb) -> None:
    summary = marked_json(nb, "@@NETWORKS@@")
    # 1. Both schemes learn the digits (chance is 10 %) and share their first epoch (same network,
    # same first permutation); no claim on which is ahead after 4 epochs and 2 seeds.
    digits = summary["digits"]
    assert set(digits) == {"random_reshuffle", "grab_mean_balance"}, digits
    for name, accuracy in digits.items():
        assert len(accuracy) == 4 and accuracy[-1] > 0.75, (name, accuracy)
    assert abs(digits["random_reshuffle"][0] - digits["grab_mean_balance"][0]) < 0.01, digits
    # 2. The score model learns (loss falls) and its samples sit on the four modes, about equally.
    score = summary["score"]
    assert score["finite"], score
    assert score["last_epoch_loss"] < 0.8 * score["first_epoch_loss"], score
    assert score["within_3_std_of_a_mean"] > 0.8, score
    assert all(0.15 < f < 0.35 for f in score["mode_fractions"]), score
    # prior draws N(0, I) would score about -40 nats; the trained model is within 1.5 of exact draws
    assert score["mean_log_p_samples"] > score["mean_log_p_exact"] - 1.5, score
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the two figures were not displayed"


def check_guidance(nb) -> None:
    # 1. Exact KLs (no Monte Carlo) to p(x|c)^γ p(x)^(1-γ): at γ = 1 CFG-DDIM is conditional
    # DDIM (discretisation error only); at γ = 4 it misses the target by far more than PCG, whose
    # KL falls with every doubling of the corrector steps.
    kl = marked_json(nb, "@@GUIDANCE@@")
    assert set(kl) >= {"cfg_ddim", "cfg_ddpm", "pcg_K1", "pcg_K2", "pcg_K4"}, kl
    assert kl["cfg_ddim"]["1.0"] < 1e-2 < kl["cfg_ddpm"]["4.0"] < kl["cfg_ddim"]["4.0"], kl
    assert kl["cfg_ddim"]["4.0"] > 50 * kl["pcg_K4"]["4.0"], kl
    for gamma in ("2.0", "4.0", "8.0"):
        k1, k2, k4 = (kl[f"pcg_K{k}"][gamma] for k in (1, 2, 4))
        assert k1 > 1.5 * k2 > 2.25 * k4, (gamma, k1, k2, k4)
    # 2. Feynman-Kac at γ = 4, means over independent systems: the weights remove most of the
    # plain guided SDE's bias (4 joint standard errors) and more particles do better.
    fk = marked_json(nb, "@@FK@@")
    for num in ("128", "1024"):
        row = fk[num]["fk"]
        assert row["nonfinite_systems"] == 0 and row["mean_resamplings"] > 0, (num, row)
        assert 0.0 < row["min_ess_fraction"] <= 1.0, (num, row)
    big, plain = fk["1024"]["fk"], fk["1024"]["plain_sde"]
    assert big["kl"] + 4 * math.hypot(big["kl_se"], plain["kl_se"]) < plain["kl"], fk["1024"]
    assert big["kl"] < 0.5 * plain["kl"], fk["1024"]
    assert big["kl"] < fk["128"]["fk"]["kl"], fk
    # 3. The Itô estimate's error falls with the steps, each time by 3 joint SEs, at an order
    # near 1/2; OR reaches the Monte Carlo floor of the mixture; AND's samples sit where the
    # experts' exact log-densities are far closer than at OR's.
    sd = marked_json(nb, "@@SUPERDIFF@@")
    rows = [sd["ito"][s] for s in sorted(sd["ito"], key=int)]
    assert len(rows) >= 3, sd["ito"]
    for a, b in zip(rows, rows[1:]):
        margin = 3 * math.hypot(a["abs_error_se"], b["abs_error_se"])
        assert b["abs_error"] + margin < a["abs_error"], rows
    assert 0.3 < sd["ito_order"] < 0.9, sd["ito_order"]
    assert sd["or"]["nonfinite"] == 0 and sd["and"]["nonfinite"] == 0, sd
    assert sd["or"]["sliced_w2"] < sd["or"]["exact_sliced_w2"] + 0.15, sd["or"]
    gap = sd["exact_log_density_gap"]
    assert gap["and"]["mean"] < 0.5 * gap["or"]["mean"], gap
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "the four figures were not displayed"


CHECKS = {
    "sde_solvers.ipynb": (
        ["import json as _j\nprint('@@SDE@@' + _j.dumps(summary))"],
        check_sde_solvers,
    ),
    "shuffling.ipynb": (
        ["import json as _j\nprint('@@SLOPES@@' + _j.dumps(slopes))"],
        check_shuffling,
    ),
    "networks.ipynb": (
        ["import json as _j\nprint('@@NETWORKS@@' + _j.dumps(summary))"],
        check_networks,
    ),
    "error_feedback.ipynb": (
        ["import json as _j\nprint('@@EF@@' + _j.dumps(summary))"],
        check_error_feedback,
    ),
    "mcmc.ipynb": (
        ["import json as _j\nprint('@@MCMC@@' + _j.dumps(summary))"],
        check_mcmc,
    ),
    "guidance.ipynb": ([], check_guidance),  # the notebook prints its own marker lines
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
