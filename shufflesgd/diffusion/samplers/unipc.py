r"""UniPC: the unified predictor (UniP) and corrector (UniC), multistep, orders 1 to 3.

UniPC (Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for
Fast Sampling of Diffusion Models", NeurIPS 2023) solves the probability-flow ODE as an
exponential integrator in :math:`\lambda_t = \log(\alpha_t/\sigma_t)`, like DPM-Solver++
(:mod:`shufflesgd.diffusion.samplers.dpm_solver`), but builds every higher-order term from one
family of formulas: a linear combination of the divided differences of the previous model
outputs, weighted by the solution of a small Vandermonde system whose right-hand side holds the
:math:`\varphi`-functions of the step.  The same family gives a predictor (UniP-:math:`p`, order
:math:`p`) and a corrector (UniC-:math:`p`) that lifts any order-:math:`p` update to order
:math:`p + 1` using the model evaluation at the new point, which the next step needs anyway: the
corrector costs no evaluation (their Sec. 3).  :func:`unipc` is the multistep UniPC of the
authors' ``uni_pc.py`` and of diffusers' ``UniPCMultistepScheduler``, with both choices of
:math:`B(h)` and both the data and the noise parameterisation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import (
    Model,
    SamplerInfo,
    check_sampler_arguments,
    finish_at_zero,
    first_nonfinite,
)

Array = jax.Array

#: The two choices of :math:`B(h)` (the ``variant`` of :func:`unipc`): ``"bh1"`` is
#: :math:`B(h) = h`, ``"bh2"`` is :math:`B(h) = e^h - 1`.
UNIPC_VARIANTS = ("bh1", "bh2")
#: What UniPC extrapolates (the ``prediction`` of :func:`unipc`): the data prediction
#: :math:`\hat x_0` (``"x0"``) or the noise prediction :math:`\hat\varepsilon` (``"eps"``).
UNIPC_PREDICTIONS = ("x0", "eps")


def _check_unipc_options(
    order: object, variant: object, prediction: object, corrector: object, lower_order_final: object
) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got order={order!r}")
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"variant must be one of {list(UNIPC_VARIANTS)}, got variant={variant!r}")
    if prediction not in UNIPC_PREDICTIONS:
        raise ValueError(
            f"prediction must be one of {list(UNIPC_PREDICTIONS)}, got prediction={prediction!r}"
        )
    for name, flag in (("corrector", corrector), ("lower_order_final", lower_order_final)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {name}={flag!r}")


def _select(order: Array, *by_order: tuple[Array | float, ...]) -> tuple[Array, ...]:
    """Per entry, the value of the tuple for ``order`` (1, 2 or 3): ``by_order[order - 1]``."""
    first, second, third = by_order
    return tuple(
        jnp.where(order >= 3, c, jnp.where(order >= 2, b, a))
        for a, b, c in zip(first, second, third)
    )


def _uni_bh_update(
    x: Array,
    m0: Array,
    m1: Array,
    m2: Array,
    m_t: Array | None,
    lam: tuple[Array, Array, Array, Array],
    coefficients: tuple[Array, Array, Array, Array],
    order: Array,
    *,
    data: bool,
    bh1: bool,
) -> Array:
    r"""One UniP-``order`` step (``m_t is None``) or UniC-``order`` correction from
    :math:`(x, s_0)` to :math:`t`: ``m0``, ``m1``, ``m2`` are the model outputs at
    :math:`s_0, s_1, s_2` (latest first), ``m_t`` the one at the predicted point at :math:`t`;
    ``lam = (lambda_s0, lambda_s1, lambda_s2, lambda_t)``, ``coefficients = (alpha_s0,
    sigma_s0, alpha_t, sigma_t)``.  Entries that ``order`` does not use may hold anything
    finite; the step's own :math:`h` must be finite and non-zero where the result is used."""
    lam0, lam1, lam2, lam_t = lam
    a0, s0, a_t, s_t = coefficients
    h = lam_t - lam0
    z = -h if data else h
    phi = jnp.expm1(z)  # h phi_1(h) in the paper's notation
    # g_k = k! z phi_{k+1}(z), by the recursion of the reference implementations (it cancels for
    # small |z|: g_k loses about eps / |z|^(k-1) of relative accuracy, on terms that are small)
    g1 = phi / z - 1.0
    g2 = g1 / z - 0.5
    g3 = g2 / z - 1.0 / 6.0
    b_h = z if bh1 else phi
    b0, b1, b2 = g1 / b_h, 2.0 * g2 / b_h, 6.0 * g3 / b_h
    # nodes r_k = (lambda_{s_k} - lambda_{s_0}) / h; distinct placeholders where unused
    r1 = jnp.where(order >= 2, (lam1 - lam0) / h, -1.0)
    r2 = jnp.where(order >= 3, (lam2 - lam0) / h, -2.0)
    d1, d2 = (m1 - m0) / r1, (m2 - m0) / r2
    # rho solves sum_k rho_k r_k^(j-1) = b_j, j = 1..(number of nodes), in Lagrange form; a
    # single node gets 1/2, as in the authors' code (UniP-2 and UniC-1)
    if m_t is None:  # UniP-p: nodes r_1 .. r_{p-1}
        rho1, rho2 = _select(
            order,
            (0.0, 0.0),
            (0.5, 0.0),
            ((b1 - r2 * b0) / (r1 - r2), (b1 - r1 * b0) / (r2 - r1)),
        )
        residual = rho1 * d1 + rho2 * d2
    else:  # UniC-p: nodes r_1 .. r_{p-1} and r_p = 1 (the new point)
        rho1, rho2, rho_t = _select(
            order,
            (0.0, 0.0, 0.5),
            ((b1 - b0) / (r1 - 1.0), 0.0, (b1 - r1 * b0) / (1.0 - r1)),
            (
                (r2 * b0 - (r2 + 1.0) * b1 + b2) / ((r1 - r2) * (r1 - 1.0)),
                (r1 * b0 - (r1 + 1.0) * b1 + b2) / ((r2 - r1) * (r2 - 1.0)),
                (r1 * r2 * b0 - (r1 + r2) * b1 + b2) / ((1.0 - r1) * (1.0 - r2)),
            ),
        )
        residual = rho1 * d1 + rho2 * d2 + rho_t * (m_t - m0)
    if data:
        return (s_t / s0) * x - a_t * phi * m0 - a_t * b_h * residual
    return (a_t / a0) * x - s_t * phi * m0 - s_t * b_h * residual


class _UniPCStep(NamedTuple):
    r"""The inputs of step ``i`` of the multistep loop (from :math:`t_i` to :math:`t_{i+1}`), one
    array per field stacked over the steps for ``lax.scan``: times, :math:`\lambda`,
    :math:`\alpha` and :math:`\sigma` at :math:`t_i`, at the previous points (indices clamped at
    0 during warm-up) and at :math:`t_{i+1}`, and the step's UniP and UniC orders."""

    t: Array
    t_next: Array
    lam: Array
    lam_1: Array
    lam_2: Array
    lam_3: Array
    lam_next: Array
    alpha_1: Array
    sigma_1: Array
    alpha: Array
    sigma: Array
    alpha_next: Array
    sigma_next: Array
    predictor_order: Array
    corrector_order: Array


def _unipc_steps(
    sde: SDE, grid: Array, order: int, lower_order_final: bool, corrector: bool
) -> _UniPCStep:
    """The stacked :class:`_UniPCStep` inputs of every step of the multistep loop on ``grid``
    (the orders of :func:`unipc`: warm-up, ``lower_order_final``, first order to sigma = 0)."""
    num_steps = grid.shape[0] - 1
    lam = 0.5 * sde.log_snr(grid)  # lambda = log(alpha / sigma): +inf where sigma = 0
    alpha, sigma = sde.alpha(grid), sde.sigma(grid)
    index = jnp.arange(num_steps)
    back = [jnp.maximum(index - k, 0) for k in (1, 2, 3)]
    predictor_order = jnp.minimum(order, index + 1)
    if lower_order_final:
        predictor_order = jnp.minimum(predictor_order, num_steps - index)
    predictor_order = jnp.where(sigma[1:] > 0, predictor_order, 1)  # to sigma = 0: first order
    # step i corrects the state that step i - 1 predicted, with step i - 1's order (0: none)
    corrector_order = jnp.where(index >= 1, predictor_order[back[0]], 0) if corrector else 0 * index
    return _UniPCStep(
        grid[:-1],
        grid[1:],
        lam[:-1],
        lam[back[0]],
        lam[back[1]],
        lam[back[2]],
        lam[1:],
        alpha[back[0]],
        sigma[back[0]],
        alpha[:-1],
        sigma[:-1],
        alpha[1:],
        sigma[1:],
        predictor_order,
        corrector_order,
    )


def _unipc_correct(
    model: Model,
    sde: SDE,
    x: Array,
    x_prev: Array,
    history: tuple[Array, Array, Array],
    step: _UniPCStep,
    *,
    prediction: str,
    bh1: bool,
) -> tuple[Array, Array]:
    """Evaluate the model once at the predicted state ``x`` at :math:`t_i` and let that output
    correct it (UniC with the previous step's order, from the corrected state ``x_prev`` at
    :math:`t_{i-1}` and the ``history`` of outputs at :math:`t_{i-1}, t_{i-2}, t_{i-3}`): the
    output and the corrected state."""
    m1, m2, m3 = history
    m = model.predict(sde, x, step.t, prediction)
    correct = step.corrector_order > 0
    lam_prev = jnp.where(correct, step.lam_1, step.lam - 1.0)  # any finite step where unused
    corrected = _uni_bh_update(
        x_prev,
        m1,
        m2,
        m3,
        m,
        (lam_prev, step.lam_2, step.lam_3, step.lam),
        (step.alpha_1, step.sigma_1, step.alpha, step.sigma),
        step.corrector_order,
        data=prediction == "x0",
        bh1=bh1,
    )
    return m, jnp.where(correct, corrected, x)


def _unipc_update(
    x: Array,
    history: tuple[Array, Array, Array],
    step: _UniPCStep,
    *,
    prediction: str,
    bh1: bool,
    m_next: Array | None = None,
) -> Array:
    r"""UniP with the step's order from the corrected state ``x`` at :math:`t_i` to
    :math:`t_{i+1}`, with the ``history`` of outputs at :math:`t_i, t_{i-1}, t_{i-2}`; given
    ``m_next``, the output at the point so predicted, that step's UniC correction instead (what
    the next step's :func:`_unipc_correct` computes).  A step to :math:`\sigma = 0` is
    :math:`\alpha\hat x_0` either way."""
    m, m1, m2 = history
    data = prediction == "x0"
    to_zero = ~(step.sigma_next > 0)
    lam_next = jnp.where(to_zero, step.lam + 1.0, step.lam_next)  # any finite step where unused
    updated = _uni_bh_update(
        x,
        m,
        m1,
        m2,
        m_next,
        (step.lam, step.lam_1, step.lam_2, lam_next),
        (step.alpha, step.sigma, step.alpha_next, step.sigma_next),
        step.predictor_order,
        data=data,
        bh1=bh1,
    )
    x0 = m if data else (x - step.sigma * m) / step.alpha
    return jnp.where(to_zero, step.alpha_next * x0, updated)


def unipc(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    order: int = 2,
    variant: str = "bh2",
    prediction: str = "x0",
    corrector: bool = True,
    lower_order_final: bool = True,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Multistep UniPC (Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector
    Framework for Fast Sampling of Diffusion Models", NeurIPS 2023, Sec. 3, Alg. 1-3: UniC-p,
    UniP-p and the multistep UniPC-p, with the two choices of :math:`B(h)` the paper compares),
    checked against the authors' ``multistep_uni_pc_bh_update`` and diffusers'
    ``multistep_uni_p_bh_update`` / ``multistep_uni_c_bh_update``.

    With :math:`\lambda = \log(\alpha/\sigma)`, a step from :math:`s_0` to :math:`t` has
    :math:`h = \lambda_t - \lambda_{s_0}`; let :math:`z = -h` for the data prediction
    (``prediction="x0"``, model outputs :math:`m = \hat x_0`) and :math:`z = h` for the noise
    prediction (``"eps"``, :math:`m = \hat\varepsilon`), and :math:`c_t = \alpha_t`,
    respectively :math:`\sigma_t`.  From the model outputs :math:`m_0, m_1, \ldots` at
    :math:`s_0, s_1, \ldots` (latest first), with nodes :math:`r_k = (\lambda_{s_k} -
    \lambda_{s_0})/h` and divided differences :math:`D_k = (m_k - m_0)/r_k`,

    .. math:: \tilde x_t = \frac{\sigma_t}{\sigma_{s_0}}x_{s_0} - \alpha_t(e^{z}-1)\,m_0
              \;\Big(\text{or } \frac{\alpha_t}{\alpha_{s_0}}x_{s_0} - \sigma_t(e^{z}-1)\,m_0\Big),
              \qquad x_t = \tilde x_t - c_t B(z)\sum_k \rho_k D_k,

    where :math:`\rho` solves the Vandermonde system :math:`\sum_k \rho_k r_k^{j-1} = b_j`,
    :math:`b_j = j!\,z\,\varphi_{j+1}(z)/B(z)` (:math:`\varphi_1(z) = (e^z - 1)/z`,
    :math:`\varphi_{k+1}(z) = (\varphi_k(z) - 1/k!)/z`).  UniP-:math:`p` (the predictor, order
    :math:`p`) uses the :math:`p - 1` previous outputs, :math:`j = 1..p-1`; UniC-:math:`p` (the
    corrector) adds the node :math:`r_p = 1` with :math:`D_p = m_t - m_0`, :math:`m_t` the model
    output at the predicted :math:`x_t`, :math:`j = 1..p`, and replaces :math:`x_t` by the
    corrected value: order :math:`p + 1`.  A system with a single node is given
    :math:`\rho = 1/2` (UniP-2 and UniC-1), as in the authors' code; the 2x2 and 3x3 systems
    are solved in closed (Lagrange) form.  ``variant`` picks :math:`B(z) = z` (``"bh1"``) or
    :math:`B(z) = e^z - 1` (``"bh2"``).

    The multistep loop: at each grid point the model is evaluated once at the predicted state;
    that output first corrects the state just predicted (UniC with the previous step's order,
    when ``corrector``) and then enters the history of the next UniP step from the corrected
    state.  The last step is not corrected (that would need an evaluation at the end of the
    grid), so ``nfe = N`` for :math:`N` steps, plus the final step.  Step :math:`i` (from 0) has
    order :math:`\min(\text{order}, i + 1)` (warm-up), and with ``lower_order_final``
    :math:`\min(\text{order}, i + 1, N - i)`: the last step first order, the one before at most
    second, on every grid, as in both reference implementations (DPM-Solver's rule applies only
    below 15 steps).  The warm-up steps are where the global order is decided when the model
    output varies over the first steps: the first step's local error is :math:`O(h^2)` (UniP-1)
    or :math:`O(h^3)` (UniP-1 corrected by UniC-1), which caps the global order at
    :math:`\min(p, 2)` without and :math:`\min(p + 1, 3)` with the corrector, asymptotically;
    starting from pure noise, where the output hardly varies, the warm-up costs little.  A
    step to :math:`\sigma = 0` is first order, :math:`x = \alpha\hat x_0`, and the model is
    never evaluated there (as in
    :func:`~shufflesgd.diffusion.samplers.dpm_solver.dpm_solver_pp_2m`).
    ``order=1, corrector=False`` is DDIM (:math:`\eta = 0`).

    Orders are data: each step's coefficients are selected with ``jnp.where`` inside one
    ``lax.scan``, so one program serves every step.  Deterministic: ``key`` and ``noise`` are
    unused.  Defaults (diffusers'): ``order=2``, ``variant="bh2"``, ``prediction="x0"`` (the
    authors recommend the data prediction for guided sampling), ``corrector=True``,
    ``lower_order_final=True``, ``final="denoise"`` (one more evaluation when the grid ends at
    :math:`\sigma > 0`, none at :math:`\sigma = 0`).  ``order`` (1, 2 or 3), ``variant``,
    ``prediction`` and the two flags are static Python values, checked before tracing."""
    del key, noise
    check_sampler_arguments(grid, final, x=x)
    _check_unipc_options(order, variant, prediction, corrector, lower_order_final)
    bh1 = variant == "bh1"
    grid = jnp.asarray(grid)
    steps = _unipc_steps(sde, grid, order, lower_order_final, corrector)

    def body(carry, step):
        # x: the state predicted at t_i; x_prev: the (corrected) state at t_{i-1}; m1, m2, m3:
        # the model outputs at t_{i-1}, t_{i-2}, t_{i-3} (zeros during warm-up)
        x, x_prev, m1, m2, m3 = carry
        m, x = _unipc_correct(
            model, sde, x, x_prev, (m1, m2, m3), step, prediction=prediction, bh1=bh1
        )
        x_next = _unipc_update(x, (m, m1, m2), step, prediction=prediction, bh1=bh1)
        return (x_next, x, m, m1, m2), jnp.all(jnp.isfinite(x_next))

    zeros = jnp.zeros_like(x)
    (x, _, _, _, _), finite = jax.lax.scan(body, (x, zeros, zeros, zeros, zeros), steps)
    num_steps = grid.shape[0] - 1
    return finish_at_zero(
        model, sde, x, grid, final, jnp.asarray(num_steps), first_nonfinite(finite)
    )
