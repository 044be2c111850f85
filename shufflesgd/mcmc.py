r"""MCMC kernels as pure ``(init, step)`` pairs, in the manner of BlackJAX.

A kernel is a :class:`SamplingAlgorithm` built from a log-density (static), with

* ``init(position) -> state``;
* ``step(key, state, *hyper) -> (state, info)``, the hyper-parameters (step size, ...)
  passed as possibly traced arguments, so one compiled program serves a vmapped sweep.

Chains are ``jax.vmap`` over keys and initial positions; runs are ``lax.scan`` over steps
with ``fold_in(key, step)`` keys (:func:`run_chain`).  Positions are pytrees.  ``info``
always carries the acceptance probability and the number of gradient evaluations, so the
loops never look inside a kernel.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from shufflesgd._checks import check_int, check_positive
from shufflesgd.shuffling import ShufflingScheme, check_batch_size, minibatches

PyTree = Any
LogDensity = Callable[[PyTree], jax.Array]


class SamplingAlgorithm(NamedTuple):
    """``init(position) -> state`` and ``step(key, state, *hyper) -> (state, info)``."""

    init: Callable[[PyTree], Any]
    step: Callable[..., tuple[Any, Any]]


class GradientState(NamedTuple):
    """Position with its log-density and gradient (so a rejected move costs nothing)."""

    position: PyTree
    logdensity: jax.Array
    logdensity_grad: PyTree


class MCMCInfo(NamedTuple):
    """Per-step diagnostics.

    Attributes:
      acceptance_rate: the Metropolis–Hastings acceptance probability (1 for unadjusted
        kernels).
      is_accepted: whether the proposal was taken.
      num_grad_evals: gradient evaluations spent by this step.
      energy_error: the change of the Hamiltonian (HMC; 0 elsewhere).
    """

    acceptance_rate: jax.Array
    is_accepted: jax.Array
    num_grad_evals: jax.Array
    energy_error: jax.Array


def _value_and_grad(logdensity_fn: LogDensity, position: PyTree) -> GradientState:
    value, grad = jax.value_and_grad(logdensity_fn)(position)
    return GradientState(position, value, grad)


def check_logdensity(logdensity_fn: LogDensity, position: PyTree) -> None:
    """``ValueError`` unless ``logdensity_fn(position)`` is a real scalar (checked by shape only)."""
    out = jax.eval_shape(logdensity_fn, position)
    if out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"logdensity_fn must return a real scalar, got shape {out.shape} and dtype {out.dtype}")


def _normal_like(key: jax.Array, tree: PyTree) -> PyTree:
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def _axpy(a: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(lambda u, v: a * u + v, x, y)


def _langevin_proposal(state: GradientState, step_size: jax.Array, noise: PyTree) -> PyTree:
    drift = _axpy(step_size, state.logdensity_grad, state.position)
    return _axpy(jnp.sqrt(2.0 * step_size), noise, drift)


def baoab(first_force: Callable[[PyTree], PyTree], second_force: Callable[[PyTree], PyTree], position: PyTree,
          velocity: PyTree, noise: PyTree, step_size: jax.Array, friction: jax.Array) -> tuple[PyTree, PyTree]:
    r"""One BAOAB step of underdamped Langevin dynamics with unit mass (Leimkuhler & Matthews
    2013, "Rational construction of stochastic numerical methods for molecular sampling",
    AMRX): half kick B :math:`v \mathrel{+}= \frac h2 F(x)`, half drift A
    :math:`x \mathrel{+}= \frac h2 v`, exact Ornstein–Uhlenbeck O
    :math:`v \leftarrow e^{-\gamma h}v + \sqrt{1-e^{-2\gamma h}}\,z`, A, B.  The first kick uses
    ``first_force`` and the last ``second_force`` (the same function, or one with its own
    randomness); ``noise`` is :math:`z`, shaped like ``velocity``."""
    half = 0.5 * step_size
    velocity = _axpy(half, first_force(position), velocity)
    position = _axpy(half, velocity, position)
    decay = jnp.exp(-friction * step_size)
    velocity = jax.tree.map(lambda v, z: decay * v + jnp.sqrt(1.0 - decay**2) * z, velocity, noise)
    position = _axpy(half, velocity, position)
    return position, _axpy(half, second_force(position), velocity)


def _info(acceptance: Any, accepted: Any, grads: int, energy: Any = 0.0) -> MCMCInfo:
    return MCMCInfo(jnp.asarray(acceptance), jnp.asarray(accepted), jnp.asarray(grads, jnp.int32),
                    jnp.asarray(energy))


def ula(logdensity_fn: LogDensity) -> SamplingAlgorithm:
    r"""Unadjusted Langevin algorithm (Roberts & Tweedie 1996, Eq. 1.3; Durmus & Moulines 2017):
    :math:`x' = x + h\nabla\log\pi(x) + \sqrt{2h}\,z`.  Biased at :math:`O(h)`; one gradient
    a step.  ``step(key, state, step_size)``."""

    def init(position: PyTree) -> GradientState:
        check_logdensity(logdensity_fn, position)
        return _value_and_grad(logdensity_fn, position)

    def step(key: jax.Array, state: GradientState, step_size: jax.Array):
        check_positive("step_size", step_size)
        proposal = _langevin_proposal(state, step_size, _normal_like(key, state.position))
        return _value_and_grad(logdensity_fn, proposal), _info(1.0, True, 1)

    return SamplingAlgorithm(init, step)


def mala(logdensity_fn: LogDensity) -> SamplingAlgorithm:
    r"""Metropolis-adjusted Langevin (Roberts & Tweedie 1996, Sec. 1.4): the ULA proposal
    :math:`q(x'|x) = N(x + h\nabla\log\pi(x), 2h I)` accepted with probability
    :math:`\min(1, \pi(x')q(x|x')/(\pi(x)q(x'|x)))`, which makes :math:`\pi` invariant.
    One gradient a step.  ``step(key, state, step_size)``."""

    def log_q(to: GradientState, frm: GradientState, step_size: jax.Array) -> jax.Array:
        mean = _axpy(step_size, frm.logdensity_grad, frm.position)
        diff = optax.tree.sub(to.position, mean)
        return -optax.tree.norm(diff, squared=True) / (4.0 * step_size)

    def init(position: PyTree) -> GradientState:
        check_logdensity(logdensity_fn, position)
        return _value_and_grad(logdensity_fn, position)

    def step(key: jax.Array, state: GradientState, step_size: jax.Array):
        check_positive("step_size", step_size)
        noise_key, accept_key = jax.random.split(key)
        proposal = _value_and_grad(
            logdensity_fn, _langevin_proposal(state, step_size, _normal_like(noise_key, state.position))
        )
        log_ratio = (proposal.logdensity + log_q(state, proposal, step_size)
                     - state.logdensity - log_q(proposal, state, step_size))
        log_ratio = jnp.where(jnp.isnan(log_ratio), -jnp.inf, log_ratio)
        acceptance = jnp.exp(jnp.minimum(log_ratio, 0.0))
        accepted = jnp.log(jax.random.uniform(accept_key)) < log_ratio
        new = jax.tree.map(lambda p, s: jnp.where(accepted, p, s), proposal, state)
        return new, _info(acceptance, accepted, 1)

    return SamplingAlgorithm(init, step)


def hmc(logdensity_fn: LogDensity, num_leapfrog: int) -> SamplingAlgorithm:
    r"""Hamiltonian Monte Carlo with a leapfrog integrator (Duane et al. 1987; Neal 2011,
    "MCMC using Hamiltonian dynamics", Fig. 2).

    Momentum :math:`p \sim N(0, M)` with a diagonal mass ``inverse_mass`` :math:`= M^{-1}`;
    ``num_leapfrog`` (static) leapfrog steps of size :math:`\epsilon`; accept with
    probability :math:`\min(1, e^{-\Delta H})`, :math:`H = -\log\pi(x) + \frac12 p^\top
    M^{-1}p`.  ``num_leapfrog`` gradients a step.  ``step(key, state, step_size,
    inverse_mass=1.0)``."""
    num_leapfrog = check_int("num_leapfrog", num_leapfrog)

    def init(position: PyTree) -> GradientState:
        check_logdensity(logdensity_fn, position)
        return _value_and_grad(logdensity_fn, position)

    def step(key: jax.Array, state: GradientState, step_size: jax.Array, inverse_mass: Any = 1.0):
        check_positive("step_size", step_size)
        check_positive("inverse_mass", inverse_mass)
        flat, unravel = ravel_pytree(state.position)
        inv_mass = jnp.broadcast_to(jnp.asarray(inverse_mass, flat.dtype), flat.shape)
        momentum_key, accept_key = jax.random.split(key)
        p0 = jax.random.normal(momentum_key, flat.shape, flat.dtype) / jnp.sqrt(inv_mass)

        def flat_grad(s: GradientState) -> jax.Array:
            return ravel_pytree(s.logdensity_grad)[0]

        def leapfrog(carry, _):
            s, p = carry
            p = p + 0.5 * step_size * flat_grad(s)
            x = ravel_pytree(s.position)[0] + step_size * inv_mass * p
            s = _value_and_grad(logdensity_fn, unravel(x))
            p = p + 0.5 * step_size * flat_grad(s)
            return (s, p), None

        (proposal, p1), _ = jax.lax.scan(leapfrog, (state, p0), length=num_leapfrog)
        kinetic = lambda p: 0.5 * jnp.sum(inv_mass * p**2)  # noqa: E731
        energy_error = (-proposal.logdensity + kinetic(p1)) - (-state.logdensity + kinetic(p0))
        energy_error = jnp.where(jnp.isnan(energy_error), jnp.inf, energy_error)
        acceptance = jnp.exp(jnp.minimum(-energy_error, 0.0))
        accepted = jax.random.uniform(accept_key) < acceptance
        new = jax.tree.map(lambda a, b: jnp.where(accepted, a, b), proposal, state)
        return new, _info(acceptance, accepted, num_leapfrog, energy_error)

    return SamplingAlgorithm(init, step)


# ------------------------------------------------------------------ stochastic gradients

GradientEstimator = Callable[[PyTree, jax.Array], PyTree]


class SGState(NamedTuple):
    """Position (and momentum, for SGHMC) of a stochastic-gradient chain."""

    position: PyTree
    momentum: PyTree


def sgld(grad_estimator: GradientEstimator) -> SamplingAlgorithm:
    r"""Stochastic gradient Langevin dynamics (Welling & Teh 2011, Eq. 4), in ULA's scaling:
    :math:`x' = x + h\,\hat g(x) + \sqrt{2h}\,z` with :math:`\hat g` an unbiased estimate of
    :math:`\nabla\log\pi` from a minibatch, e.g. :math:`\nabla\log p(x) + \frac{N}{b}
    \sum_{i\in B}\nabla\log p(y_i|x)`.  ``grad_estimator(position, batch_indices)``;
    ``step(key, state, batch_indices, step_size)``; one gradient a step."""

    def init(position: PyTree) -> SGState:
        return SGState(position, None)

    def step(key: jax.Array, state: SGState, batch: jax.Array, step_size: jax.Array):
        check_positive("step_size", step_size)
        grad = grad_estimator(state.position, batch)
        drift = _axpy(step_size, grad, state.position)
        position = _axpy(jnp.sqrt(2.0 * step_size), _normal_like(key, state.position), drift)
        return SGState(position, None), _info(1.0, True, 1)

    return SamplingAlgorithm(init, step)


SGHMC_INTEGRATORS = ("euler", "baoab")


def sghmc(grad_estimator: GradientEstimator, integrator: str = "euler") -> SamplingAlgorithm:
    r"""Stochastic gradient HMC (Chen, Fox, Guestrin 2014), unit mass, friction :math:`\gamma`.

    ``integrator="euler"`` is their Eq. 9 (with :math:`\hat B = 0`):
    :math:`v' = v + h\hat g(x) - h\gamma v + \sqrt{2\gamma h}\,z`, :math:`x' = x + h v'`; one
    gradient a step.  ``integrator="baoab"`` is :func:`baoab`, the symmetric splitting of
    Leimkuhler & Matthews (2013) for underdamped Langevin, both kicks with the same minibatch
    (symmetric in the data as well); two gradients a step.  With exact gradients BAOAB
    samples a Gaussian target's positions exactly.
    ``step(key, state, batch_indices, step_size, friction)``.
    """
    if integrator not in SGHMC_INTEGRATORS:
        raise ValueError(f"integrator must be one of {list(SGHMC_INTEGRATORS)}, got {integrator!r}")

    def init(position: PyTree) -> SGState:
        return SGState(position, optax.tree.zeros_like(position))

    def step(key: jax.Array, state: SGState, batch: jax.Array, step_size: jax.Array, friction: jax.Array):
        check_positive("step_size", step_size)
        check_positive("friction", friction)
        x, v = state
        z = _normal_like(key, v)
        if integrator == "euler":
            v = jax.tree.map(lambda v, g, z: v + step_size * g - step_size * friction * v
                             + jnp.sqrt(2.0 * friction * step_size) * z, v, grad_estimator(x, batch), z)
            return SGState(_axpy(step_size, v, x), v), _info(1.0, True, 1)
        force = lambda position: grad_estimator(position, batch)  # noqa: E731
        return SGState(*baoab(force, force, x, v, z, step_size, friction)), _info(1.0, True, 2)

    return SamplingAlgorithm(init, step)


def run_minibatch_chain(
    kernel: SamplingAlgorithm, key: jax.Array, state: SGState, scheme: ShufflingScheme, num_epochs: int,
    batch_size: int, *hyper: Any, record: str = "step",
) -> tuple[SGState, PyTree, MCMCInfo]:
    """A stochastic-gradient chain whose minibatches follow a shuffling scheme of
    :mod:`shufflesgd.shuffling` (with replacement, RR, SS, ...): ``num_epochs`` epochs of
    ``epoch_length / batch_size`` steps.

    ``record="step"`` returns the position and info after every step (leading axis
    ``num_epochs * steps_per_epoch``); ``record="epoch"`` only after each epoch's last step
    (leading axis ``num_epochs``), which keeps memory flat in the chain length: the orders
    of shuffled schemes are only balanced over whole epochs, so that is where their bias is
    measured.  The chain itself is the same bit for bit either way."""
    if record not in ("step", "epoch"):
        raise ValueError(f"record must be 'step' or 'epoch', got record={record!r}")
    steps_per_epoch = check_batch_size(scheme.epoch_length, batch_size)
    order_key, step_key = jax.random.split(key)

    def epoch(carry, k):
        chain_state, scheme_state = carry
        scheme_state, order = scheme.next_epoch(scheme_state)

        def one(chain_state, inputs):
            t, batch = inputs
            chain_state, info = kernel.step(jax.random.fold_in(step_key, t), chain_state, batch, *hyper)
            return chain_state, ((chain_state.position, info) if record == "step" else info)

        steps = k * steps_per_epoch + jnp.arange(steps_per_epoch)
        chain_state, out = jax.lax.scan(one, chain_state, (steps, minibatches(order, batch_size)))
        if record == "epoch":
            out = (chain_state.position, jax.tree.map(lambda a: a[-1], out))
        return (chain_state, scheme_state), out

    (state, _), (positions, infos) = jax.lax.scan(
        epoch, (state, scheme.init(order_key, None)), jnp.arange(num_epochs)
    )
    if record == "epoch":
        return state, positions, infos
    flatten = lambda tree: jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), tree)  # noqa: E731
    return state, flatten(positions), flatten(infos)


# ------------------------------------------------------------------ step-size adaptation


class DualAveragingState(NamedTuple):
    log_step: jax.Array
    log_step_average: jax.Array
    error_sum: jax.Array
    count: jax.Array
    mu: jax.Array


def dual_averaging_init(initial_step_size: float) -> DualAveragingState:
    """Start dual averaging at ``initial_step_size`` with :math:`\\mu = \\log(10\\epsilon_0)`."""
    log_step = jnp.log(jnp.asarray(initial_step_size, jnp.result_type(float)))
    zero = jnp.zeros_like(log_step)
    return DualAveragingState(log_step, zero, zero, jnp.zeros((), jnp.int32), jnp.log(10.0) + log_step)


def dual_averaging_update(
    state: DualAveragingState, acceptance: jax.Array, target: float = 0.8,
    gamma: float = 0.05, t0: float = 10.0, kappa: float = 0.75,
) -> DualAveragingState:
    r"""One step of Nesterov dual averaging on :math:`\log\epsilon` (Hoffman & Gelman 2014,
    "The No-U-Turn Sampler", Alg. 5, Eq. 6):
    :math:`\bar H_m = (1-\frac1{m+t_0})\bar H_{m-1} + \frac{\delta - \alpha_m}{m+t_0}`,
    :math:`\log\epsilon_m = \mu - \frac{\sqrt m}{\gamma}\bar H_m`,
    :math:`\log\bar\epsilon_m = m^{-\kappa}\log\epsilon_m + (1-m^{-\kappa})\log\bar\epsilon_{m-1}`.
    Use ``exp(log_step_average)`` after adaptation."""
    m = state.count + 1
    mf = m.astype(state.log_step.dtype)
    weight = 1.0 / (mf + t0)
    error_sum = (1.0 - weight) * state.error_sum + weight * (target - acceptance)
    log_step = state.mu - jnp.sqrt(mf) / gamma * error_sum
    eta = mf ** (-kappa)
    average = eta * log_step + (1.0 - eta) * state.log_step_average
    return DualAveragingState(log_step, average, error_sum, m, state.mu)


def adapt_step_size(
    kernel: SamplingAlgorithm, key: jax.Array, state: Any, initial_step_size: float,
    num_steps: int, target: float = 0.8, **hyper: Any,
) -> tuple[Any, jax.Array]:
    """Run ``num_steps`` of ``kernel`` while dual averaging tunes the step size to reach the
    mean acceptance ``target``; return the final state and the adapted step size."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must lie in (0, 1), got target={target}")

    def body(carry, t):
        chain_state, da = carry
        chain_state, info = kernel.step(jax.random.fold_in(key, t), chain_state, jnp.exp(da.log_step), **hyper)
        return (chain_state, dual_averaging_update(da, info.acceptance_rate, target)), None

    (state, da), _ = jax.lax.scan(body, (state, dual_averaging_init(initial_step_size)), jnp.arange(num_steps))
    return state, jnp.exp(da.log_step_average)


def run_chain(
    kernel: SamplingAlgorithm, key: jax.Array, state: Any, num_steps: int, *hyper: Any,
) -> tuple[Any, PyTree, MCMCInfo]:
    """``num_steps`` of ``kernel`` with keys ``fold_in(key, t)``: returns the final state, the
    positions after every step (leading axis ``num_steps``) and the per-step infos."""

    def body(chain_state, t):
        chain_state, info = kernel.step(jax.random.fold_in(key, t), chain_state, *hyper)
        return chain_state, (chain_state.position, info)

    state, (positions, infos) = jax.lax.scan(body, state, jnp.arange(num_steps))
    return state, positions, infos


# ------------------------------------------------------------------ diagnostics


def _autocovariance(x: np.ndarray) -> np.ndarray:
    """Autocovariance of each chain along the last axis, via FFT (biased estimator)."""
    n = x.shape[-1]
    centred = x - x.mean(axis=-1, keepdims=True)
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(centred, n=size, axis=-1)
    return np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=-1)[..., :n] / n


def effective_sample_size(chains: Any) -> np.ndarray:
    r"""ESS of ``chains`` with shape ``[num_chains, num_draws, ...]`` (per trailing entry).

    The multi-chain estimator of Vehtari et al. (2021), "Rank-normalization, folding, and
    localization: An improved R-hat", Eq. 10-11 (without rank normalisation), with Geyer's
    (1992) initial monotone sequence truncation: :math:`\hat\rho_t = 1 -
    (W - \overline{\gamma_t})/\widehat{var}^+`, summed in pairs while positive.
    """
    x = np.asarray(chains, np.float64)
    m, n = x.shape[:2]
    x = np.moveaxis(x.reshape(m, n, -1), 1, -1)  # [m, k, n]
    acov = _autocovariance(x)
    chain_var = acov[..., 0] * n / (n - 1.0)
    within = chain_var.mean(axis=0)
    between = x.mean(axis=-1).var(axis=0, ddof=1) if m > 1 else np.zeros_like(within)
    var_plus = within * (n - 1.0) / n + between
    rho = 1.0 - (within[:, None] - acov.mean(axis=0)) / var_plus[:, None]  # [k, n]
    rho[:, 0] = 1.0
    ess = np.empty(rho.shape[0])
    for j, r in enumerate(rho):
        pairs = r[: 2 * (n // 2)].reshape(-1, 2).sum(axis=1)
        positive = np.where(pairs < 0)[0]
        pairs = pairs[: positive[0]] if positive.size else pairs
        pairs = np.minimum.accumulate(pairs)  # initial monotone sequence
        tau = -1.0 + 2.0 * pairs.sum()
        ess[j] = m * n / max(tau, 1.0 / np.log10(m * n))
    return ess.reshape(np.asarray(chains).shape[2:])


def split_rhat(chains: Any) -> np.ndarray:
    r"""Split-:math:`\hat R` (Gelman et al., BDA3, Eq. 11.4; Vehtari et al. 2021, Eq. 4):
    each chain is cut in two halves, then :math:`\hat R = \sqrt{\widehat{var}^+/W}`."""
    x = np.asarray(chains, np.float64)
    m, n = x.shape[:2]
    half = n // 2
    x = np.concatenate([x[:, :half], x[:, n - half:]], axis=0)
    within = x.var(axis=1, ddof=1).mean(axis=0)
    between = half * x.mean(axis=1).var(axis=0, ddof=1)
    var_plus = (half - 1.0) / half * within + between / half
    return np.sqrt(var_plus / within)
