r"""DC-Solver: UniPC with dynamic compensation, the search for its ratios, and cascade polynomial
regression (CPR) of those ratios over the number of steps.

DC-Solver (Zhao, Wang, Zhou & Lu 2024, "DC-Solver: Improving Predictor-Corrector Diffusion
Sampler via Dynamic Compensation", ECCV 2024) starts from a misalignment in multistep
predictor-corrector samplers such as UniPC (:mod:`shufflesgd.diffusion.samplers.unipc`): the
model output :math:`m_i = m_\theta(\tilde x_{t_i}, t_i)` is taken at the *predicted* state
:math:`\tilde x_{t_i}`, corrects it (UniC) and is then reused by the next predictor (UniP) as if
it had been taken at the *corrected* state :math:`x_{t_i}`.  Dynamic compensation replaces that
output, before the predictor uses it, by the Lagrange interpolant of the last :math:`K + 1`
stored outputs (:math:`K` = ``dc_order``) evaluated at a time moved between :math:`t_{i-1}` and
:math:`t_i` by a per-step compensation ratio :math:`\rho_i`,

.. math:: \hat m_i = \sum_{k=0}^{K} m_{i-k} \prod_{j \ne k}
          \frac{\tau_i - t_{i-j}}{t_{i-k} - t_{i-j}}, \qquad
          \tau_i = \rho_i\,t_i + (1 - \rho_i)\,t_{i-1},

and the ratios are fitted to a reference trajectory once (the search stage), or predicted for an
unseen number of steps from ratios fitted at others (CPR).  The paper's Sec. 3 sets out the
compensation, the search and CPR; its section, equation and algorithm numbers could not be
checked offline, so the facts below are those of the authors' code (``wl-zhao/DC-Solver``:
``DCSolver.dynamic_compensation``, ``search_dc`` / ``find_optim_ratio`` and ``sample`` in
``stable-diffusion/.../dc_solver.py``; ``DCSolverMultistepScheduler`` and its
``cascade_polynomial_regression`` in ``diffusers/.../scheduling_dcsolver_multistep.py``):

* the interpolation runs in the solver's time :math:`t` (the continuous VP time, or the
  integer timestep in the diffusers port: Lagrange weights do not change under an affine map
  of :math:`t`), not in :math:`\lambda`; here :math:`t` is the grid's time, that of the process;
* the interpolated outputs are the stored history, i.e. :math:`m_{i-1}, m_{i-2}, \ldots` are
  themselves the compensated outputs of the earlier steps, and :math:`\hat m_i` replaces
  :math:`m_i` in the history for good: the UniP step from :math:`t_i`, the UniC correction at
  :math:`t_{i+1}` and the later steps all see :math:`\hat m_i`;
* compensation starts once :math:`K + 1` outputs are stored, at step :math:`i = K`, as in
  the diffusers port, which keeps ``max(order, dc_order + 1)`` outputs (the Stable Diffusion
  code keeps ``order`` of them, so there it compensates only when ``order > dc_order``); the
  ratios of the first :math:`K` steps are set to 1 by the search and by CPR and are unused;
* :math:`\rho_i = 1` is the neutral ratio: :math:`\tau_i = t_i` is a node, where the Lagrange
  weights are exactly 1 and 0, so :math:`\hat m_i = m_i` bit for bit and DC-Solver is UniPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shufflesgd._checks import (
    check_finite,
    check_float_array,
    check_int,
    check_positive_finite,
    is_concrete,
)
from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import (
    Model,
    SamplerInfo,
    check_grid,
    check_sampler_arguments,
    finish_at_zero,
    first_nonfinite,
)
from shufflesgd.diffusion.samplers.unipc import (
    _check_unipc_options,
    _unipc_correct,
    _unipc_steps,
    _unipc_update,
)

Array = jax.Array

#: The interpolation orders :math:`K` of the dynamic compensation (``dc_order``): the
#: interpolant runs through the last :math:`K + 1` model outputs.
DC_ORDERS = (1, 2, 3)
#: The ratio that leaves a step uncompensated (DC-Solver is then UniPC).
NEUTRAL_RATIO = 1.0


def _check_dc_order(dc_order: object) -> None:
    if isinstance(dc_order, bool) or not isinstance(dc_order, int) or dc_order not in DC_ORDERS:
        raise ValueError(f"dc_order must be 1, 2 or 3, got dc_order={dc_order!r}")


def _check_ratios(ratios: Any, num_steps: int) -> None:
    """A float array of one ratio a step, finite where it can be inspected."""
    check_float_array("ratios", ratios, shape=(num_steps,))
    check_finite("ratios", ratios)


def _nodes(grid: Array, dc_order: int) -> tuple[Array, Array]:
    """The interpolation nodes of every step, ``[num_steps, dc_order + 1]`` (row ``i``:
    :math:`t_i, t_{i-1}, \\ldots, t_{i-K}`), and whether step ``i`` is compensated
    (:math:`i \\ge K`).  An uncompensated step gets the distinct placeholders
    :math:`t_i, t_i + 1, \\ldots` so that its (unused) interpolant and its gradient stay
    finite."""
    index = jnp.arange(grid.shape[0] - 1)
    apply = index >= dc_order
    k = jnp.arange(dc_order + 1)
    real = grid[jnp.maximum(index[:, None] - k, 0)]
    placeholder = grid[index][:, None] + k
    return jnp.where(apply[:, None], real, placeholder), apply


def _compensate(ratio: Array, outputs: tuple[Array, ...], nodes: Array, apply: Array) -> Array:
    r"""The dynamic compensation of one step: the Lagrange interpolant through
    ``(nodes[k], outputs[k])`` (latest first) at :math:`\tau = \rho\,t_i + (1 - \rho)\,t_{i-1}`,
    or ``outputs[0]`` itself where ``apply`` is false.  With :math:`\rho = 1`, :math:`\tau = t_i`
    exactly and the weights are exactly 1 and 0."""
    tau = ratio * nodes[0] + (1.0 - ratio) * nodes[1]
    total = jnp.zeros_like(outputs[0])
    for k in range(nodes.shape[0]):
        weight = 1.0
        for j in range(nodes.shape[0]):
            if j != k:
                weight = weight * (tau - nodes[j]) / (nodes[k] - nodes[j])
        total = total + weight * outputs[k]
    return jnp.where(apply, total, outputs[0])


def dc_solver(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    ratios: Array | None = None,
    order: int = 2,
    variant: str = "bh2",
    prediction: str = "x0",
    lower_order_final: bool = True,
    dc_order: int = 2,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""DC-Solver (Zhao, Wang, Zhou & Lu 2024, "DC-Solver: Improving Predictor-Corrector
    Diffusion Sampler via Dynamic Compensation", ECCV 2024, Sec. 3; the authors' ``sample``
    loop): multistep UniPC (:func:`~shufflesgd.diffusion.samplers.unipc.unipc`, UniP-``order``
    with UniC) whose model output at :math:`t_i` is replaced, after it has corrected the state
    at :math:`t_i` and before the UniP step from :math:`t_i` uses it, by its dynamic
    compensation

    .. math:: \hat m_i = \sum_{k=0}^{K} m_{i-k} \prod_{j \ne k}
              \frac{\tau_i - t_{i-j}}{t_{i-k} - t_{i-j}}, \qquad
              \tau_i = \rho_i\,t_i + (1 - \rho_i)\,t_{i-1},

    the Lagrange interpolant of order :math:`K` (``dc_order``) through the stored outputs
    :math:`m_i, m_{i-1}, \ldots, m_{i-K}` (the earlier ones already compensated) in the grid's
    time :math:`t`, evaluated at the time :math:`\tau_i` set by the step's ratio :math:`\rho_i`
    (``ratios[i]``).  :math:`\hat m_i` then stays in the history: the next correction and the
    next :math:`K` interpolants use it, as in the authors' loop.  Steps :math:`i < K` are not
    compensated (fewer than :math:`K + 1` outputs are stored): their ratios are unused.

    ``ratios``: a float array of shape ``[num_steps]``, one ratio a step, traced (one compiled
    program serves any ratios; ``vmap`` over them sweeps several), or ``None``: no compensation
    at all, which is :func:`unipc` (with ``corrector=True``).  The neutral ratio is
    :data:`NEUTRAL_RATIO` = 1: :math:`\tau_i = t_i` is a node, where the weights are exactly 1
    and 0, so ``ratios=jnp.ones(num_steps)`` reproduces :func:`unipc` bit for bit.
    :math:`\rho_i = 0` reuses the previous output; ratios outside :math:`[0, 1]` extrapolate.
    Fit ratios with :func:`fit_dc_ratios` or predict them with :func:`predict_dc_ratios`.

    Everything else is :func:`unipc`'s: one evaluation a step (``nfe = N`` plus the final
    step), the warm-up and ``lower_order_final`` orders, a first-order step to
    :math:`\sigma = 0` (:math:`x = \alpha\hat x_0`, with the compensated output), no corrector
    after the last step, ``final`` applied at ``grid[-1]``.  Deterministic: ``key`` and
    ``noise`` are unused.  ``order`` (1, 2 or 3), ``variant``, ``prediction``,
    ``lower_order_final`` and ``dc_order`` (1, 2 or 3) are static Python values, checked
    before tracing, as are the shape and dtype of ``ratios`` (and its values where concrete).
    Defaults: :func:`unipc`'s, with the diffusers port's ``dc_order=2``."""
    del key, noise
    check_sampler_arguments(grid, final, x=x)
    _check_unipc_options(order, variant, prediction, True, lower_order_final)
    _check_dc_order(dc_order)
    grid = jnp.asarray(grid)
    num_steps = grid.shape[0] - 1
    if ratios is not None:
        _check_ratios(ratios, num_steps)
        ratios = jnp.asarray(ratios)
    bh1 = variant == "bh1"
    steps = _unipc_steps(sde, grid, order, lower_order_final, True)
    nodes, apply = _nodes(grid, dc_order)

    def body(carry, inputs):
        # x: the state predicted at t_i; x_prev: the corrected state at t_{i-1}; m1, m2, m3: the
        # (compensated) model outputs at t_{i-1}, t_{i-2}, t_{i-3} (zeros during warm-up)
        step, ratio, step_nodes, step_apply = inputs
        x, x_prev, m1, m2, m3 = carry
        m, x = _unipc_correct(
            model, sde, x, x_prev, (m1, m2, m3), step, prediction=prediction, bh1=bh1
        )
        if ratios is not None:
            m = _compensate(ratio, (m, m1, m2, m3), step_nodes, step_apply)
        x_next = _unipc_update(x, (m, m1, m2), step, prediction=prediction, bh1=bh1)
        return (x_next, x, m, m1, m2), jnp.all(jnp.isfinite(x_next))

    zeros = jnp.zeros_like(x)
    step_ratios = jnp.ones(num_steps, grid.dtype) if ratios is None else ratios
    (x, _, _, _, _), finite = jax.lax.scan(
        body, (x, zeros, zeros, zeros, zeros), (steps, step_ratios, nodes, apply)
    )
    return finish_at_zero(
        model, sde, x, grid, final, jnp.asarray(num_steps), first_nonfinite(finite)
    )


class DCRatioFit(NamedTuple):
    """What :func:`fit_dc_ratios` returns: the fitted ratios, one a step (``[num_steps]``, the
    neutral 1 at the first ``dc_order`` steps), and the loss of every optimisation step at
    every grid step (``[num_steps, steps]``, taken before the update; constant, the
    uncompensated loss, at the steps that are not compensated)."""

    ratios: Array
    losses: Array


def fit_dc_ratios(
    model: Model,
    sde: SDE,
    x_T: Array,
    grid: Array,
    reference: Array,
    *,
    steps: int = 40,
    learning_rate: float | Array = 0.1,
    weight_decay: float | Array = 0.01,
    order: int = 2,
    variant: str = "bh2",
    prediction: str = "x0",
    lower_order_final: bool = True,
    dc_order: int = 2,
) -> DCRatioFit:
    r"""The search stage of DC-Solver (Zhao, Wang, Zhou & Lu 2024, ECCV 2024, Sec. 3; the
    authors' ``search_dc`` / ``find_optim_ratio``): fit the compensation ratios of
    :func:`dc_solver` on a few trajectories of a reference solver, greedily, one step at a
    time.

    ``x_T`` (``[batch, *shape]``) are the starting points and ``reference``
    (``[batch, num_steps, *shape]``) the reference trajectories' states at the grid times
    ``grid[1:]``: the authors take about ten trajectories of a many-step solver (200-step DDIM)
    from the same noise.  DC-Solver runs on all trajectories at once; at step :math:`i \ge K`
    (``dc_order``) the ratio :math:`\rho_i` alone is fitted, starting from the neutral 1, by
    ``steps`` AdamW steps (optax's ``adamw`` with ``learning_rate`` and ``weight_decay``; the
    authors' PyTorch ``AdamW`` at learning rate 0.1 and its default weight decay 0.01, for 40
    steps in their Stable Diffusion code and 20 in their diffusers port) on the mean squared
    error, over trajectories and coordinates,

    .. math:: L_i(\rho_i) = \operatorname{mean}\bigl(x_{t_{i+1}}(\rho_i)
              - x^{\mathrm{ref}}_{t_{i+1}}\bigr)^2,

    between the state that step :math:`i` reaches at :math:`t_{i+1}` and the reference state
    there; :math:`x_{t_{i+1}}(\rho_i)` is the state after the UniC correction (the model
    evaluated at the predicted point, differentiated through), the predicted state at the
    last step, which has no corrector.  The fitted ratio is then applied and the sampler moves
    on to the next step.  So every intermediate state is matched, each by its own step's
    ratio, with the earlier ratios held fixed: the loss is not the final state's alone, and
    the ratios are not fitted jointly.  The first :math:`K` steps are not compensated and keep
    the neutral ratio.

    Both loops are ``lax.scan`` (grid steps outside, optimisation steps inside), so the
    whole search is one program; wrap the call in ``jax.jit`` to compile it once.
    ``learning_rate`` and ``weight_decay`` may be traced; ``steps`` and the sampler options
    (those of :func:`dc_solver`, whose defaults they share) are static and checked before
    tracing, with the shapes of ``x_T`` and ``reference``.  Returns a :class:`DCRatioFit`."""
    if is_concrete(grid):
        check_grid(grid)
    check_float_array("x_T", x_T)
    if np.ndim(x_T) < 1 or np.shape(x_T)[0] < 1:
        raise ValueError(
            f"x_T must hold a batch of starting points, [batch, *shape], got shape {np.shape(x_T)}"
        )
    num_steps = int(np.shape(grid)[0]) - 1
    expected = (np.shape(x_T)[0], num_steps) + tuple(np.shape(x_T)[1:])
    check_float_array("reference", reference, shape=expected)
    steps = check_int("steps", steps)
    check_positive_finite(learning_rate=learning_rate)
    if is_concrete(weight_decay) and not (
        np.all(np.isfinite(np.asarray(weight_decay))) and np.all(np.asarray(weight_decay) >= 0)
    ):
        raise ValueError(
            f"weight_decay must be non-negative and finite, got weight_decay={weight_decay!r}"
        )
    _check_unipc_options(order, variant, prediction, True, lower_order_final)
    _check_dc_order(dc_order)
    bh1 = variant == "bh1"
    grid = jnp.asarray(grid)
    x_T = jnp.asarray(x_T)
    dtype = x_T.dtype
    schedule = _unipc_steps(sde, grid, order, lower_order_final, True)
    nodes, apply = _nodes(grid, dc_order)
    last = jnp.arange(num_steps) == num_steps - 1
    targets = jnp.moveaxis(jnp.asarray(reference, dtype), 1, 0)  # [num_steps, batch, *shape]
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
    predict = jax.vmap(lambda y, t: model.predict(sde, y, t, prediction), in_axes=(0, None))

    def body(carry, inputs):
        step, step_nodes, step_apply, step_last, target = inputs
        x, x_prev, m1, m2, m3 = carry
        m, x = jax.vmap(
            lambda y, y_prev, a, b, c: _unipc_correct(
                model, sde, y, y_prev, (a, b, c), step, prediction=prediction, bh1=bh1
            )
        )(x, x_prev, m1, m2, m3)

        def compensated(ratio):
            return _compensate(ratio, (m, m1, m2, m3), step_nodes, step_apply)

        def loss(ratio):
            m0 = compensated(ratio)
            predicted = _unipc_update(x, (m0, m1, m2), step, prediction=prediction, bh1=bh1)
            # the next step's correction; never evaluated at sigma = 0 (the last step has none)
            m_next = predict(predicted, jnp.where(step_last, step.t, step.t_next))
            corrected = _unipc_update(
                x, (m0, m1, m2), step, prediction=prediction, bh1=bh1, m_next=m_next
            )
            return jnp.mean((jnp.where(step_last, predicted, corrected) - target) ** 2)

        def search(ratio):
            def update(state, _):
                ratio, opt_state = state
                value, grad = jax.value_and_grad(loss)(ratio)
                updates, opt_state = optimizer.update(grad, opt_state, ratio)
                return (optax.apply_updates(ratio, updates), opt_state), value

            (ratio, _), values = jax.lax.scan(
                update, (ratio, optimizer.init(ratio)), None, length=steps
            )
            return ratio.astype(dtype), values.astype(dtype)

        def keep(ratio):
            return ratio, jnp.full(steps, loss(ratio), dtype)

        ratio, values = jax.lax.cond(step_apply, search, keep, jnp.asarray(NEUTRAL_RATIO, dtype))
        m = compensated(ratio)
        x_next = _unipc_update(x, (m, m1, m2), step, prediction=prediction, bh1=bh1)
        return (x_next, x, m, m1, m2), (ratio, values)

    zeros = jnp.zeros_like(x_T)
    _, (ratios, losses) = jax.lax.scan(
        body, (x_T, zeros, zeros, zeros, zeros), (schedule, nodes, apply, last, targets)
    )
    return DCRatioFit(ratios, losses)


class CascadePolynomial(NamedTuple):
    r"""A cascade polynomial regression of compensation ratios over the step and the number of
    steps (:func:`fit_cascade_polynomial`): the ratio of step :math:`i` (from 0) of an
    :math:`N`-step grid is

    .. math:: \rho(i, N) = \sum_{a} \Bigl(\sum_b c_{ab}\,u^b\Bigr) x^a, \qquad
              x = \frac{i + 1}{N}, \quad u = \frac{N}{\text{nfe\_scale}},

    ``coefficients[a, b]`` = :math:`c_{ab}`, for :math:`i \ge` ``dc_order``; the earlier steps
    are not compensated (ratio 1)."""

    coefficients: np.ndarray
    dc_order: int
    nfe_scale: float


def _cascade_features(x: np.ndarray, u: np.ndarray, step_degree: int, nfe_degree: int):
    """The monomials :math:`x^a u^b` of the cascade, one row a point, ``a``-major."""
    powers_x = x[:, None] ** np.arange(step_degree + 1)
    powers_u = u[:, None] ** np.arange(nfe_degree + 1)
    return (powers_x[:, :, None] * powers_u[:, None, :]).reshape(x.shape[0], -1)


def fit_cascade_polynomial(
    nfes: Sequence[int],
    ratios: Sequence[Any],
    *,
    dc_order: int = 2,
    step_degree: int = 2,
    nfe_degree: int = 2,
    nfe_scale: float = 50.0,
) -> CascadePolynomial:
    r"""Cascade polynomial regression (CPR) of DC-Solver's ratios (Zhao, Wang, Zhou & Lu 2024,
    ECCV 2024, Sec. 3; the authors' ``cascade_polynomial_regression``): fit ratios searched at
    several numbers of steps so that those of an unseen number of steps can be predicted
    (:func:`predict_dc_ratios`) without a search.

    The cascade: at a fixed number of steps :math:`N` the ratio is a polynomial of degree
    ``step_degree`` in the normalised step :math:`x = (i + 1)/N` (the authors' 1-based step
    over the NFE); each of its coefficients is a polynomial of degree ``nfe_degree`` in
    :math:`u = N/\text{nfe\_scale}` (the authors: quadratics in both, :math:`u = \text{NFE}/50`),
    see :class:`CascadePolynomial`.  The authors cascade one level more, over the
    classifier-free guidance scale (:math:`\text{CFG}/12`), between the two; this library has
    no guidance in its samplers yet, so only the NFE level is fitted.  Here the NFE is the
    number of grid steps :math:`N` (the authors' NFE; ``info.nfe`` adds one for a final
    denoising step).

    The authors' repository ships the evaluation of the cascade and its fitted coefficients,
    not the fit; the evaluation takes all coefficients at once in the calling convention of
    ``scipy.optimize.curve_fit`` (``predict(xs, *coeffs)``), i.e. one least-squares fit of
    every coefficient to all the (NFE, step, ratio) points together.  The cascade is linear in
    its coefficients, so that least-squares problem is solved here in closed form
    (``numpy.linalg.lstsq``).  Only the compensated steps :math:`i \ge` ``dc_order`` are data
    (the others are 1 by construction).

    ``nfes``: the numbers of steps, distinct ints above ``dc_order``; ``ratios``: one float
    array of shape ``[nfes[k]]`` each (e.g. the ``ratios`` of a :class:`DCRatioFit`).
    ``ValueError`` when the points cannot determine the coefficients (fewer than
    ``nfe_degree + 1`` numbers of steps, or too few compensated steps)."""
    _check_dc_order(dc_order)
    step_degree = check_int("step_degree", step_degree, minimum=0)
    nfe_degree = check_int("nfe_degree", nfe_degree, minimum=0)
    check_positive_finite(nfe_scale=nfe_scale)
    if isinstance(nfes, (str, bytes)) or not isinstance(nfes, Sequence):
        raise TypeError(f"nfes must be a sequence of ints, got nfes={nfes!r}")
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence):
        raise TypeError(f"ratios must be a sequence of arrays, got ratios: {type(ratios)}")
    nfes = [check_int("nfes", n, minimum=dc_order + 1) for n in nfes]
    if len(set(nfes)) != len(nfes):
        raise ValueError(f"nfes must be distinct, got nfes={nfes}")
    if len(ratios) != len(nfes):
        raise ValueError(
            f"ratios must hold one array per entry of nfes ({len(nfes)}), got {len(ratios)}"
        )
    if len(nfes) < nfe_degree + 1:
        raise ValueError(
            f"nfes must hold at least nfe_degree + 1 = {nfe_degree + 1} numbers of steps, "
            f"got nfes={nfes}"
        )
    xs, us, values = [], [], []
    for n, row in zip(nfes, ratios):
        check_float_array("ratios", row, shape=(n,))
        check_finite("ratios", row)
        i = np.arange(dc_order, n)
        xs.append((i + 1.0) / n)
        us.append(np.full(i.shape, n / float(nfe_scale)))
        values.append(np.asarray(row, np.float64)[dc_order:])
    design = _cascade_features(np.concatenate(xs), np.concatenate(us), step_degree, nfe_degree)
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError(
            f"ratios hold too few compensated steps to fit a degree-{step_degree} polynomial "
            f"in the step at each of {nfe_degree + 1} numbers of steps (nfes={nfes})"
        )
    solution = np.linalg.lstsq(design, np.concatenate(values), rcond=None)[0]
    return CascadePolynomial(
        solution.reshape(step_degree + 1, nfe_degree + 1), dc_order, float(nfe_scale)
    )


def predict_dc_ratios(cpr: CascadePolynomial, nfe: int) -> np.ndarray:
    r"""The ratios of an ``nfe``-step grid (``[nfe]``, float64) predicted by a cascade
    polynomial regression (:func:`fit_cascade_polynomial`): the polynomial of
    :class:`CascadePolynomial` at every step :math:`i \ge` ``cpr.dc_order``, the neutral 1 at
    the earlier ones (the authors' ``cascade_polynomial_regression``)."""
    if not isinstance(cpr, CascadePolynomial):
        raise TypeError(
            f"cpr must be a CascadePolynomial (from fit_cascade_polynomial), got {type(cpr)}"
        )
    nfe = check_int("nfe", nfe)
    coefficients = np.asarray(cpr.coefficients, np.float64)
    i = np.arange(nfe)
    features = _cascade_features(
        (i + 1.0) / nfe,
        np.full(nfe, nfe / cpr.nfe_scale),
        coefficients.shape[0] - 1,
        coefficients.shape[1] - 1,
    )
    return np.where(i >= cpr.dc_order, features @ coefficients.reshape(-1), NEUTRAL_RATIO)
