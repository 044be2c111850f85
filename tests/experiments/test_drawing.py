"""The draw functions of the log-scale studies draw only finite points: metrics holding NaN,
inf or ``None`` (a diverged run) give a PNG, no exception, and a legend label that says how
many points were left out."""

import math

import numpy as np
import pytest
from ml_collections import ConfigDict

from experiments import (
    bn_shuffling,
    common,
    ef21_reloaded,
    ef_divergence,
    ef_sweep,
    grab_digits,
    guidance_targets,
    restart_contraction,
    sampler_nfe,
    score_model,
    sghmc_minibatch,
)

NAN, INF = math.nan, math.inf


@pytest.fixture
def legend_texts(monkeypatch):
    """Every legend label of the figures saved through :func:`common.save_figure`."""
    texts = []
    save = common.save_figure

    def capture(fig, path):
        for axis in fig.axes:
            legend = axis.get_legend()
            if legend is not None:
                texts.extend(t.get_text() for t in legend.get_texts())
        save(fig, path)

    monkeypatch.setattr(common, "save_figure", capture)
    return texts


def assert_drawn(path, texts, expected):
    assert path.is_file() and path.stat().st_size > 0
    assert any(expected in t for t in texts), texts


def test_restart_contraction_draws_finite_points(tmp_path, legend_texts):
    rows = [
        dict(sampler="restart", nfe=8, tv_mean=0.2, tv_se=0.01),
        dict(sampler="restart", nfe=16, tv_mean=NAN, tv_se=NAN),
        dict(sampler="restart", nfe=32, tv_mean=INF, tv_se=0.0),
        dict(sampler="euler", nfe=8, tv_mean=None, tv_se=None),
    ]
    path = tmp_path / "figure.png"
    restart_contraction.draw(ConfigDict(dict(error_above=0.5)), rows, NAN, path)
    assert_drawn(path, legend_texts, "restart (2 diverged points not shown)")
    assert "euler (1 diverged points not shown)" in legend_texts


def test_ef_divergence_marks_the_last_finite_point(tmp_path, legend_texts, monkeypatch):
    """A ratio curve that overflows to inf and then NaN is drawn up to its last finite point,
    which carries the diverged_step marker; a curve that never diverges has none."""
    marked = []
    plot = ef_divergence.plt.Axes.plot

    def record(axis, *args, **kwargs):
        if "diverged_step" in str(kwargs.get("label", "")):
            marked.append((list(args[0]), list(args[1])))
        return plot(axis, *args, **kwargs)

    monkeypatch.setattr(ef_divergence.plt.Axes, "plot", record)
    steps = 6
    growing = np.array([[1.0, 10.0, 1e3, 1e200, INF, NAN, NAN]])
    shrinking = np.array([[1.0, 0.5, 0.25, 0.1, 0.05, 0.0, 0.01]])
    metrics = dict(
        step_size_multiples=[1.0],
        step_sizes=[0.1],
        dtype="float64",
        methods=dict(compressed_gd=dict(diverged_step=[5]), ef21=dict(diverged_step=[-1])),
    )
    config = ConfigDict(dict(num_steps=steps, c=2.0))
    path = tmp_path / "figure.png"
    ef_divergence.draw(metrics, dict(compressed_gd=growing, ef21=shrinking), config, path)
    assert_drawn(path, legend_texts, "compressed_gd diverged_step = 5")
    assert marked == [([3], [200.0])]
    assert not any("ef21 diverged_step" in t for t in legend_texts)


def test_ef_sweep_draws_finite_points(tmp_path, legend_texts):
    def row(values, mean, stderr):
        return dict(
            curve=dict(bits=[0.0, 10.0, 20.0, 30.0], relative_grad_norm_sq=values),
            bits_to_epsilon=dict(mean=mean, stderr=stderr),
        )

    metrics = dict(
        compressors=dict(
            top_k=dict(multipliers={"1": row([1.0, 0.1, 0.01, 1e-3], 25.0, 1.0)}),
            natural=dict(multipliers={"1": row([1.0, 10.0, INF, None], None, None)}),
        )
    )
    config = ConfigDict(dict(step_multipliers=(1.0,), epsilon=1e-2, spread=10.0, num_seeds=2))
    path = tmp_path / "figure.png"
    ef_sweep.draw(metrics, config, path)
    assert_drawn(path, legend_texts, "×1 (2 diverged points not shown)")
    assert "natural (1 points not shown)" in legend_texts


def test_ef21_reloaded_draws_finite_points(tmp_path, legend_texts):
    def method(values, mean):
        return dict(
            curve=dict(bits=[0.0, 10.0, 20.0], relative_grad_norm_sq=values),
            bits_to_epsilon=dict(mean=mean),
        )

    methods = dict(
        ef21_qm=method([1.0, 0.1, 1e-3], 15.0),
        ef21_am=method([1.0, NAN, INF], NAN),
        ef21_w=method([1.0, None, 1e-3], 20.0),
    )
    metrics = dict(
        compressors=dict(top_k=dict(spreads={"10": dict(qm_over_am=0.5, methods=methods)}))
    )
    config = ConfigDict(dict(spreads=(10.0,), epsilon=1e-2))
    path = tmp_path / "figure.png"
    ef21_reloaded.draw(metrics, config, path)
    assert_drawn(path, legend_texts, "EF21 (L_AM) (2 diverged points not shown)")
    assert "EF21-W (L_AM) (1 diverged points not shown)" in legend_texts


def test_sampler_nfe_draws_finite_points(tmp_path, legend_texts):
    def budget(nfe, value):
        return {
            m: dict(mean=value, se=0.01) for m in ("sliced_w2", "mmd2", "mode_weight_error")
        } | {"nfe": nfe}

    metrics = dict(
        gaussian=dict(
            sde="vp",
            floor_kl=INF,
            samplers=dict(
                euler=dict(
                    grids=dict(uniform=dict(nfe=[8, 16, 32], kl=[0.5, NAN, INF], order=NAN))
                ),
                heun=dict(
                    grids=dict(uniform=dict(nfe=[8, 16, 32], kl=[0.5, 0.1, 0.01], order=2.0))
                ),
            ),
        ),
        mixtures=dict(
            ring=dict(
                dim=2,
                samplers=dict(
                    euler={"8": budget(8, 0.3), "16": budget(16, NAN), "32": budget(32, INF)}
                ),
                exact={m: dict(mean=NAN) for m in ("sliced_w2", "mmd2", "mode_weight_error")},
            )
        ),
    )
    path = tmp_path / "figure.png"
    sampler_nfe.draw(metrics, path)
    assert_drawn(path, legend_texts, "euler (—) (2 diverged points not shown)")
    assert "euler (2 diverged points not shown)" in legend_texts


def test_bn_shuffling_draws_finite_points(tmp_path, legend_texts):
    schemes = bn_shuffling.SCHEMES
    risk = {name: np.array([[1.0, 0.5, 0.2], [1.0, 0.4, 0.1]]) for name in schemes}
    risk["single_shuffle"] = np.array([[1.0, 0.5, 0.2], [1.0, NAN, INF]])
    curves = dict(
        regression=dict(rates=[0.1, 0.01], risk=risk, to_gd_optimum=risk),
        classification=dict(risk={name: [[0.6, 0.5, None], [0.6, -1.0, 0.4]] for name in schemes}),
    )
    keys = ("ss_gd", "rr_gd", "ss_rr", "ss_to_optimum", "rr_to_optimum")
    metrics = dict(
        regression=dict(
            optimal_risk=dict(gd=NAN),
            per_rate=[
                dict(learning_rate=lr, mean={k: m for k in keys}, std={k: 0.01 for k in keys})
                for lr, m in ((0.1, INF), (0.01, 0.05))
            ],
        )
    )
    config = ConfigDict(dict(num_seeds=1, classification=dict(divergence_loss=INF)))
    path = tmp_path / "figure.png"
    bn_shuffling.draw(curves, metrics, config, path)
    assert_drawn(path, legend_texts, "single_shuffle (2 diverged points not shown)")
    assert "SS-GD (1 diverged points not shown)" in legend_texts
    assert "gd (2 diverged points not shown)" in legend_texts  # classification: None and < 0


def test_grab_digits_draws_finite_points(tmp_path, legend_texts):
    def scheme(loss):
        return dict(
            test_accuracy=dict(mean=[0.5, 0.7, 0.8], stderr=[0.01, 0.01, 0.01]),
            train_loss=dict(mean=loss, stderr=[0.01, 0.01, 0.01]),
        )

    metrics = dict(
        num_epochs=3,
        schemes=dict(grab=scheme([1.0, 0.5, 0.2]), random_reshuffle=scheme([1.0, NAN, None])),
    )
    config = ConfigDict(
        dict(hidden=(8,), batch_norm=False, learning_rate=0.1, batch_size=16, num_seeds=2)
    )
    path = tmp_path / "figure.png"
    grab_digits.draw(metrics, config, path)
    assert_drawn(path, legend_texts, "random_reshuffle (2 diverged points not shown)")
    assert "grab" in legend_texts


def test_score_model_draws_finite_points(tmp_path, legend_texts):
    def budget(nfe, network, exact=0.1):
        return dict(nfe=nfe, network=dict(mean=network, se=0.01), exact=dict(mean=exact, se=0.01))

    samplers = dict(
        euler={"8": budget(8, 0.3), "16": budget(16, NAN), "32": budget(32, INF, None)},
        heun={"8": budget(8, 0.2), "16": budget(16, 0.1)},
    )
    metrics = dict(
        mixture_2d=dict(samplers=samplers, floor=dict(mean=NAN), prior=dict(mean=1.0)),
        digits=dict(
            samplers=samplers,
            floor=dict(mean=0.05),
            prior=dict(mean=INF),
            gaussian=dict(mean=None),
            process="vp",
            likelihood=[
                dict(nfe=50, bits_per_dim=dict(mean=3.0, se=0.1)),
                dict(nfe=100, bits_per_dim=dict(mean=NAN, se=NAN)),
            ],
            gaussian_bits_per_dim=dict(mean=INF),
            uniform_bits_per_dim=math.log2(17),
            exposure_bias=dict(
                samplers={
                    "ddim": {"10": budget(10, 0.4), "20": budget(20, None)},
                    "time_shift_ddim": {"10": budget(10, INF), "20": budget(20, 0.3)},
                }
            ),
        ),
    )
    path = tmp_path / "figure.png"
    score_model.draw(metrics, path)
    assert_drawn(path, legend_texts, "euler (network) (2 diverged points not shown)")
    assert "ddim (network) (1 diverged points not shown)" in legend_texts
    assert "time_shift_ddim (network) (1 diverged points not shown)" in legend_texts
    assert "euler (exact) (1 diverged points not shown)" in legend_texts
    assert "PF-ODE, vp (1 diverged points not shown)" in legend_texts


def test_sghmc_minibatch_draws_finite_points(tmp_path, legend_texts):
    fields = ("second_moment_error", "minibatch_error")

    def run(values, orders):
        points = [
            {"step_size": h, "exact_with_replacement": 0.1 * h}
            | {f: v for f in fields}
            | {f + "_se": 0.001 for f in fields}
            for h, v in zip((0.01, 0.02, 0.04), values)
        ]
        return dict(points=points, orders=orders)

    metrics = dict(
        runs={
            "sghmc/random_reshuffle": run(
                [0.01, 0.02, 0.04], {f: 1.0 for f in fields} | {"exact_with_replacement": 1.0}
            ),
            "sghmc/with_replacement": run([0.01, NAN, None], {f: None for f in fields}),
        }
    )
    config = ConfigDict(
        dict(
            kernels=("sghmc",),
            schemes=("random_reshuffle", "with_replacement"),
            batch_size=10,
            num_chains=4,
            sample_epochs=2,
        )
    )
    path = tmp_path / "figure.png"
    sghmc_minibatch.draw(metrics, config, path)
    assert_drawn(path, legend_texts, "with_replacement (order nan) (2 diverged points not shown)")
    assert "random_reshuffle (order 1.00)" in legend_texts


def test_momentum_divergence_draws_finite_points(tmp_path, legend_texts):
    from experiments import momentum_divergence

    def row(sampler, w, nfe, rms, se, fraction):
        return dict(
            problem="mixture_2d",
            guidance_scale=w,
            sampler=sampler,
            nfe=nfe,
            rms_mean=rms,
            rms_se=se,
            blown_up_fraction=fraction,
        )

    rows = [
        row("dpm_solver_pp_2m", 7.5, 6, NAN, NAN, NAN),
        row("dpm_solver_pp_2m", 7.5, 8, INF, 0.1, 0.5),
        row("dpm_solver_pp_2m", 7.5, 10, 0.2, 0.01, 0.0),
        row("dpm_solver_pp_hb(beta=0.8)", 7.5, 6, None, None, None),
        row("dpm_solver_pp_hb(beta=0.8)", 7.5, 8, 0.3, INF, 0.0),
        row("dpm_solver_pp_hb(beta=0.8)", 7.5, 10, 0.1, 0.01, 0.0),
        row("ghvb(order=4, beta=0.8)", 1.0, 6, None, None, None),
    ]
    metrics = dict(
        blowup_factor=NAN,
        problems=dict(mixture_2d=dict(dim=2, rows=rows), mixture_high_dim=dict(rows=[])),
    )
    path = tmp_path / "figure.png"
    momentum_divergence.draw(metrics, path)
    assert_drawn(path, legend_texts, "DPM-Solver++(2M) (2 diverged points not shown)")
    assert "DPM-Solver++(2M) (1 diverged points not shown)" in legend_texts  # blown-up fraction
    assert "DPM-Solver++(2M) HB 0.8 (2 diverged points not shown)" in legend_texts
    assert "DPM-Solver++(2M) HB 0.8 (1 diverged points not shown)" in legend_texts
    assert "GHVB 3.8 (1 diverged points not shown)" in legend_texts


def test_guided_digits_draws_finite_points(tmp_path, legend_texts):
    from experiments import guided_digits

    def row(scale, accuracy, diversity=0.3):
        return dict(
            scale=scale,
            accuracy=dict(mean=accuracy, se=0.01),
            diversity=dict(mean=diversity, se=0.01),
        )

    metrics = dict(
        methods=dict(
            conditional={"1": row(1.0, 0.9)},
            cfg={"1": row(1.0, 0.9), "2": row(2.0, NAN), "4": row(4.0, None, INF)},
            apg={"1": row(1.0, 0.9), "2": row(2.0, 0.95)},
        ),
        data_diversity=dict(mean=NAN, se=0.01),
    )
    path = tmp_path / "figure.png"
    guided_digits.draw(metrics, path)
    assert_drawn(path, legend_texts, "cfg (2 diverged points not shown)")  # accuracy panel
    assert "cfg (1 diverged points not shown)" in legend_texts  # diversity panel
    assert "apg" in legend_texts and "conditional" in legend_texts
    samples = tmp_path / "samples.png"
    pictures = {"conditional": np.zeros((10, 3, 64)), "cfg": np.full((10, 3, 64), NAN)}
    guided_digits.draw_samples(pictures, 2.0, np.ones((10, 3, 64)), samples)
    assert samples.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_guidance_targets_draws_finite_points(tmp_path, legend_texts):
    config = ConfigDict(dict(budget_scale=4.0, fk_particles=(64, 512), pcg_corrector_steps=(1, 4)))
    fk = lambda n, gamma, kl: dict(  # noqa: E731
        method=f"fk_N{n}", particles=n, scale=gamma, kl=kl, kl_se=0.01,
        exact_draws_kl=0.01, exact_draws_kl_se=0.001,
    )  # fmt: skip
    results = dict(
        gaussian=dict(
            rows=[
                dict(method="cfg_ddim", scale=1.0, kl=0.02, evaluations=62),
                dict(method="cfg_ddim", scale=4.0, kl=INF, evaluations=62),
                dict(method="pcg_K1", scale=4.0, kl=0.02, evaluations=92),
                dict(method="pcg_K4", scale=4.0, kl=NAN, evaluations=272),
            ],
            fk_rows=[fk(64, 4.0, 0.2), fk(512, 4.0, NAN), fk(512, 1.0, 0.01)],
        ),
        mixture=dict(
            rows=[
                dict(method="cfg_ddim", scale=1.0, sliced_w2=0.1),
                dict(method="cfg_ddim", scale=4.0, sliced_w2=NAN),
            ],
            exact_draws_sliced_w2={"1.0": 0.05, "4.0": 0.05},
        ),
    )
    pictures = {"exact": np.zeros((4, 2)), "cfg_ddim": np.ones((4, 2))}
    path = tmp_path / "figure.png"
    guidance_targets.draw(config, results, pictures, path)
    assert_drawn(path, legend_texts, "cfg_ddim (1 diverged points not shown)")
    assert "PCG (K corrector steps) (1 diverged points not shown)" in legend_texts


def test_composition_draws_finite_points(tmp_path, legend_texts):
    from experiments import composition

    def fk_row(n, fk, naive=0.5, **labels):
        row = dict(particles=n, **labels)
        for role, value in (("fk", fk), ("naive", naive), ("exact", 0.02)):
            row[f"{role}_pooled_w2"], row[f"{role}_pooled_w2_se"] = value, 0.01
        return row

    results = dict(
        product=dict(rows=[fk_row(64, 0.2), fk_row(256, NAN), fk_row(1024, None, naive=INF)]),
        anneal=dict(
            rows=[
                fk_row(64, 0.1, beta=0.5),
                fk_row(1024, 0.05, beta=0.5),
                fk_row(64, INF, beta=2.0),
                fk_row(1024, 0.3, beta=2.0),
            ]
        ),
        ito=dict(
            rows=[
                dict(steps=25, abs_error=2.0, abs_error_se=0.1),
                dict(steps=50, abs_error=NAN, abs_error_se=0.1),
                dict(steps=100, abs_error=1.0, abs_error_se=None),
            ],
            order=NAN,
            pf_ode=dict(abs_error=0.002, evaluations=60.0),
        ),
        superdiff=dict(rows=[]),
    )
    axis = np.linspace(-4.0, 4.0, 5)
    pictures = {
        "contour_axis": axis,
        "contour_log_p1": -np.add.outer(axis**2, axis**2),
        "contour_log_p2": -np.add.outer(axis**2, (axis - 1.0) ** 2),
        "product_exact": np.zeros((4, 2)),
        "superdiff_and": np.full((4, 2), NAN),
    }
    path = tmp_path / "figure.png"
    composition.draw(results, pictures, path)
    assert_drawn(path, legend_texts, "FK (2 diverged points not shown)")
    assert "naive (1 diverged points not shown)" in legend_texts
    assert "FK β = 2 (1 diverged points not shown)" in legend_texts
    assert "Itô estimate (2 diverged points not shown)" in legend_texts  # no order: NaN
    assert "PF-ODE likelihood (60 evals)" in legend_texts
    assert "SuperDiff AND" in legend_texts and "exact p1 p2" in legend_texts


def test_thin_wire_draws_finite_points(tmp_path, legend_texts):
    from experiments import thin_wire

    def method(bits, accuracy, losses):
        return dict(
            bits_per_worker=bits,
            final_test_accuracy=dict(mean=accuracy, stderr=0.01),
            eval_steps=[0, 10, 20],
            test_loss=dict(mean=losses, stderr=[0.01, 0.01, 0.01]),
        )

    metrics = dict(
        methods=dict(
            dp=method(1e8, 0.9, [2.3, 1.0, 0.5]),
            demo=method(1e6, NAN, [2.3, NAN, INF]),
        ),
        untrained_test_accuracy=0.1,
        model="mlp",
        num_workers=8,
        num_seeds=2,
    )
    path = tmp_path / "figure.png"
    thin_wire.draw(metrics, path)
    assert_drawn(path, legend_texts, "DeMo (2 diverged points not shown)")
    assert "DP (uncompressed)" in legend_texts and "untrained" in legend_texts


def test_flat_basins_draws_finite_points(tmp_path, legend_texts):
    from experiments import flat_basins

    def row(accuracy):
        stat = dict(mean=accuracy, stderr=None if accuracy is None else 0.01)
        return {name: stat for name in flat_basins.METRICS}

    def sampler(mean, target, diverged=0):
        return dict(
            flat_fraction=dict(mean=mean, stderr=None if mean is None else 0.01),
            target="pi",
            target_value=target,
            histogram=[0, 3, 5, 2] if mean is not None else [0, 0, 0, 0],
            diverged_chains=diverged,
        )

    metrics = dict(
        num_seeds=2,
        rows={
            "sgld": row(0.9),
            "csgld": row(NAN),
            "sghmc": row(None),
            "entropy_mcmc": row(0.91),
            "entropy_mcmc:theta": row(0.9),
            "entropy_mcmc:guide": row(0.89),
        },
        toy=dict(
            weights=[0.6, 0.4],
            means=[-0.6, 0.6],
            stds=[0.25, 1.0],
            coupling=1.0,
            boundary=0.2,
            flat_weight=0.4,
            histogram_edges=[-2.0, -1.0, 0.0, 1.0, 2.0],
            samplers={
                "sgld": sampler(0.26, 0.26),
                "entropy_mcmc:theta": sampler(None, 0.26, diverged=4),
                "entropy_mcmc:guide": sampler(0.37, 0.37),
            },
        ),
    )
    path = tmp_path / "figure.png"
    flat_basins.draw(metrics, path)
    assert_drawn(path, legend_texts, "cyclical SGLD (1 diverged points not shown)")
    assert "SGHMC (1 diverged points not shown)" in legend_texts
    assert "Entropy-MCMC θ final positions (4 diverged points not shown)" in legend_texts
    assert "SGLD" in legend_texts and "quadrature target" in legend_texts
