r"""What every sampler shares: the model wrapper, the run's diagnostics, the noise convention,
the scan over a time grid and the explicit final step.

A sampler is a pure function of one sample,

    ``sampler(key, model, sde, x_T, grid, *, final=..., noise=None, **options) -> (x, info)``,

that runs ``lax.scan`` over the consecutive pairs :math:`(t_i, t_{i+1})` of a strictly
decreasing time ``grid`` (an array: :func:`shufflesgd.diffusion.time_grid` or any other
spacing).  ``model`` is a :class:`Model`: a function of ``(x, t)`` and the kind of output it
predicts (score, :math:`\varepsilon`, :math:`x_0`, :math:`v` or the flow-matching velocity),
converted as each sampler needs with :func:`shufflesgd.diffusion.convert`.  The
probability-flow drift that several samplers integrate is :math:`f(t)x - \frac12 g(t)^2
s_\theta(x, t)` (Song et al. 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations", Eq. 13), equal to the velocity (:func:`pf_ode_drift`).

Noise: step ``i``'s ``j``-th Gaussian draw is ``normal(fold_in(fold_in(key, i), j))``
(:func:`draw`), or ``noise[i, j]`` when an explicit array ``noise`` of shape
``[num_steps, draws, *x.shape]`` is given; the output is then a deterministic function of
``(x_T, noise)``, which is how :func:`shufflesgd.diffusion.exact_gaussian_law` obtains a
sampler's exact output law on a Gaussian target.  :func:`sample_batch` runs a sampler over the
rows of ``x_T`` with key ``fold_in(key, i)`` for row ``i``, so a sample depends neither on its
batch-mates nor on the batch size.

The final step is explicit (``final``, one of :data:`FINALS`): ``"none"`` stops at
``grid[-1]``; ``"denoise"`` returns the model's :math:`x_0` prediction there (Tweedie's formula,
Efron 2011, for a score model; one more evaluation); ``"euler_to_zero"`` takes one
probability-flow Euler step in :math:`t` from ``grid[-1]`` to 0 (one more evaluation).  On a
grid that ends at :math:`\sigma = 0` (:func:`finish_at_zero`) the state already is the sample:
both are the identity there and cost nothing, and no sampler evaluates the model at
:math:`\sigma = 0`.  ``info`` (:class:`SamplerInfo`) reports the exact number of model
evaluations and the first step whose state is not finite.

The building blocks below (:func:`draw`, :func:`scan_grid`, :func:`finish`,
:func:`finish_at_zero`, :func:`check_sampler_arguments`) are what a new sampler is written with;
they are imported from this module (the family package re-exports only what users call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import check_float_array, check_key, is_concrete
from shufflesgd.diffusion.processes import MODEL_OUTPUTS, SDE, convert

Array = jax.Array


#: The explicit final steps a sampler can end with (its ``final`` argument).
FINALS = ("none", "denoise", "euler_to_zero")


class Model(NamedTuple):
    """A network (or closed form) ``fn(x, t)`` and what it predicts: one of ``MODEL_OUTPUTS``."""

    fn: Callable[[Array, Array], Array]
    output: str

    def predict(self, sde: SDE, x: Array, t: Array, target: str) -> Array:
        return convert(self.fn(x, t), self.output, target, x, t, sde)


class SamplerInfo(NamedTuple):
    """Diagnostics of one sampling run: model evaluations and the first non-finite step."""

    nfe: Array
    nonfinite_step: Array


def draw(key: Array, noise: Array | None, i: Array, j: int, like: Array) -> Array:
    """Step ``i``'s ``j``-th standard Gaussian draw, shaped like ``like``: ``noise[i, j]`` when
    ``noise`` is given, else ``normal(fold_in(fold_in(key, i), j))``."""
    if noise is not None:
        return noise[i, j]
    return jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(key, i), j), like.shape, like.dtype
    )


def first_nonfinite(finite: Array) -> Array:
    """The index of the first ``False`` in ``finite``, or -1 if there is none."""
    return jnp.where(jnp.all(finite), -1, jnp.argmin(finite))


def scan_grid(
    step: Callable, x: Array, grid: Array, nfe_per_step: int
) -> tuple[Array, Array, Array]:
    """Run ``step(x, i, t, t_next) -> x`` over the grid; return x, the nfe and the first bad
    step."""

    def body(x, inputs):
        x = step(x, *inputs)
        return x, jnp.all(jnp.isfinite(x))

    grid = jnp.asarray(grid)
    steps = (jnp.arange(grid.shape[0] - 1), grid[:-1], grid[1:])
    x, finite = jax.lax.scan(body, x, steps)
    return x, jnp.asarray(nfe_per_step * (grid.shape[0] - 1)), first_nonfinite(finite)


def pf_ode_drift(model: Model, sde: SDE, x: Array, t: Array) -> Array:
    r"""The probability-flow drift :math:`f(t)x - \frac12 g(t)^2 s_\theta(x, t)` (Song et al.
    2021, Eq. 13), from any kind of model output.

    The same drift is the velocity :math:`\dot\alpha\hat x_0 + \dot\sigma\hat\varepsilon`
    (:func:`shufflesgd.diffusion.convert`), and it is evaluated in that form when the model
    outputs ``"velocity"`` (its output is then the drift itself) or the process has
    ``velocity_drift`` set (the interpolants of
    :class:`~shufflesgd.diffusion.processes.Interpolant`, where :math:`f` and :math:`g^2` are
    infinite at :math:`t = 1` while the velocity of an :math:`x_0`, :math:`v` or velocity model
    is finite).  The Euler step :math:`x + (t_{next} - t)\,u(x, t)` of a velocity model on
    :class:`~shufflesgd.diffusion.processes.RectifiedFlow` is then exactly diffusers'
    ``FlowMatchEulerDiscreteScheduler.step``.  For the other processes and outputs the drift is
    computed as before, :math:`f x - \frac12 g^2 s`."""
    if model.output == "velocity" or getattr(sde, "velocity_drift", False):
        return model.predict(sde, x, t, "velocity")
    return sde.reverse_drift(x, t, model.predict(sde, x, t, "score"), probability_flow=True)


def finish(
    model: Model, sde: SDE, x: Array, grid: Array, final: str, nfe: Array, bad: Array
) -> tuple[Array, SamplerInfo]:
    """Apply the final step (``final``) at ``grid[-1]``, count its evaluation, and report."""
    t_last = jnp.asarray(grid)[-1]
    if final == "denoise":
        x, nfe = model.predict(sde, x, t_last, "x0"), nfe + 1
    elif final == "euler_to_zero":
        x, nfe = x - t_last * pf_ode_drift(model, sde, x, t_last), nfe + 1
    bad = jnp.where((bad < 0) & ~jnp.all(jnp.isfinite(x)), jnp.asarray(grid).shape[0] - 1, bad)
    return x, SamplerInfo(nfe.astype(jnp.int32), bad.astype(jnp.int32))


def finish_at_zero(
    model: Model, sde: SDE, x: Array, grid: Array, final: str, nfe: Array, bad: Array
) -> tuple[Array, SamplerInfo]:
    r""":func:`finish` for grids that may end at :math:`\sigma = 0` (EDM's :math:`t = 0`, VP's
    :math:`t = 0`): there the state already is the sample, so ``"denoise"`` and
    ``"euler_to_zero"`` are the identity and cost no evaluation.  The model is never called at
    :math:`\sigma = 0` (the skipped branch evaluates at ``grid[-2]`` if a ``vmap`` over grids
    turns the ``cond`` into a select)."""
    grid = jnp.asarray(grid)
    if final == "none":
        return finish(model, sde, x, grid, "none", nfe, bad)
    positive = sde.sigma(grid[-1]) > 0
    t_eval = jnp.where(positive, grid[-1], grid[-2])

    def apply(x):
        if final == "denoise":
            return model.predict(sde, x, t_eval, "x0")
        return x - t_eval * pf_ode_drift(model, sde, x, t_eval)

    x = jax.lax.cond(positive, apply, lambda x: x, x)
    return finish(model, sde, x, grid, "none", nfe + positive.astype(nfe.dtype), bad)


def sigma_at_end(sde: SDE, grid: Any) -> float:
    """:math:`\\sigma` at the last time of a concrete grid, as a Python float."""
    with jax.ensure_compile_time_eval():
        return float(sde.sigma(jnp.asarray(np.asarray(grid)[-1])))


def check_final(final: str) -> None:
    if final not in FINALS:
        raise ValueError(f"final must be one of {list(FINALS)}, got {final!r}")


def check_grid(grid: Any) -> None:
    """A grid is a 1-D array of at least two strictly decreasing, non-negative times."""
    g = np.asarray(grid, np.float64)
    if g.ndim != 1 or g.shape[0] < 2:
        raise ValueError(f"grid must hold at least two times (NFE >= 1), got shape {g.shape}")
    if not np.all(np.diff(g) < 0):
        raise ValueError("grid must be strictly decreasing (from t_max down to t_min)")
    if g[-1] < 0:
        raise ValueError(f"grid must end at a time >= 0, got {g[-1]}")


_NO_KEY = object()


def check_sampler_arguments(
    grid: Any, final: str, *, x: Any = None, key: Any = _NO_KEY, noise: Any = None
) -> None:
    """The checks every sampler makes before tracing: a concrete ``grid`` and ``final``, a
    float ``x`` (``TypeError``), and, for a sampler that draws from ``key`` (given, with no
    ``noise`` to replace the draws), a PRNG ``key`` (``TypeError``)."""
    if is_concrete(grid):
        check_grid(grid)
    check_final(final)
    if x is not None:
        check_float_array("x", x)
    if key is not _NO_KEY and noise is None:
        check_key("key", key)


def check_model_output(output: str) -> None:
    if output not in MODEL_OUTPUTS:
        raise ValueError(f"model output must be one of {list(MODEL_OUTPUTS)}, got {output!r}")


def sample_batch(
    sampler: Callable[..., tuple[Array, SamplerInfo]],
    key: Array,
    model: Model,
    sde: SDE,
    x_T: Array,
    grid: Array,
    **options: Any,
) -> tuple[Array, SamplerInfo]:
    """Run ``sampler`` on each row of ``x_T`` with key ``fold_in(key, i)`` for row ``i``."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x_T.shape[0]))
    return jax.vmap(lambda k, x: sampler(k, model, sde, x, grid, **options))(keys, x_T)


def mixture_model(sde: SDE, law: Any, output: str = "score") -> Model:
    r"""The exact model of the forward marginals of a Gaussian mixture ``law`` (a
    :class:`shufflesgd.problems.EigenMixture`), the analytic test bed of every sampler:
    ``output="score"`` gives :math:`s(x, t) = \nabla\log p_t(x)` with :math:`p_t` the law of
    :math:`\alpha(t)x_0 + \sigma(t)\varepsilon`; ``output="velocity"`` the flow-matching
    velocity :math:`E[\dot\alpha x_0 + \dot\sigma\varepsilon \mid x_t = x]`
    (:meth:`~shufflesgd.problems.EigenMixture.velocity`), finite where :math:`\alpha = 0`
    (an interpolant's :math:`t = 1`)."""
    if output == "score":
        return Model(lambda x, t: law.score(x, sde.alpha(t), sde.sigma(t)), "score")
    if output == "velocity":
        return Model(
            lambda x, t: law.velocity(
                x, sde.alpha(t), sde.sigma(t), sde.alpha_dot(t), sde.sigma_dot(t)
            ),
            "velocity",
        )
    raise ValueError(f"output must be 'score' or 'velocity', got output={output!r}")
