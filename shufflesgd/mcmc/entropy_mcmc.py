r"""Entropy-MCMC: stochastic-gradient Langevin dynamics on a posterior coupled to a guiding
variable whose marginal is the Gaussian-smoothed posterior (Li & Zhang 2024, "Entropy-MCMC:
Sampling from Flat Basins with Ease", ICLR 2024, arXiv:2310.05401).

The model parameter :math:`\theta` is coupled to a guiding variable :math:`\theta_a` of the
same shape through the joint density

.. math:: p(\theta, \theta_a) \propto \exp\Big(\log\pi(\theta)
          - \frac{1}{2\eta}\|\theta - \theta_a\|^2\Big),

so that :math:`\theta` is marginally :math:`\pi` and :math:`\theta_a` is marginally the
smoothed :math:`\pi * N(0, \eta I)`, whose sharp modes are flattened (the local entropy of
Chaudhari et al. 2017, "Entropy-SGD"); its gradient pulls :math:`\theta` towards flat basins.
Sampling is SGLD on the pair, with the minibatch estimate of :math:`\nabla\log\pi` of
:mod:`shufflesgd.mcmc.stochastic_gradient`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_float_array, check_key, check_like, check_positive
from shufflesgd.mcmc.base import SamplingAlgorithm, _all_finite, _axpy, _info, _normal_like
from shufflesgd.mcmc.stochastic_gradient import GradientEstimator

PyTree = Any


class EntropyMCMCState(NamedTuple):
    r"""Both positions of an Entropy-MCMC chain.

    Attributes:
      position: the model parameter :math:`\theta` (marginally :math:`\pi`).
      guide: the guiding variable :math:`\theta_a` (marginally :math:`\pi * N(0, \eta I)`).
    """

    position: PyTree
    guide: PyTree


def entropy_mcmc(grad_estimator: GradientEstimator) -> SamplingAlgorithm:
    r"""Entropy-MCMC (Li & Zhang 2024, ICLR, arXiv:2310.05401; the update as in the authors'
    code, whose algorithm and equation numbers could not be checked offline): SGLD on the joint
    :math:`\log p(\theta, \theta_a) = \log\pi(\theta) - \|\theta - \theta_a\|^2/(2\eta)`,
    with :math:`\hat g` an unbiased minibatch estimate of :math:`\nabla\log\pi` (as in
    :func:`shufflesgd.mcmc.sgld`) and both variables moved with the same step :math:`h`:

    .. math:: \theta' = \theta + h\Big(\hat g(\theta) - \frac{\theta - \theta_a}{\eta}\Big)
              + \sqrt{2h}\,z, \qquad
              \theta_a' = \theta_a + h\,\frac{\theta - \theta_a}{\eta} + \sqrt{2h}\,z_a,

    :math:`z, z_a \sim N(0, I)` independent; one gradient estimate a step (the coupling's
    gradient is free).  Both variables are samples: :math:`\theta` of :math:`\pi` and
    :math:`\theta_a` of the smoothed :math:`\pi * N(0, \eta I)` (the authors' code keeps
    both as posterior samples).  For a Gaussian :math:`\pi = N(\mu, \Sigma)` the joint is
    Gaussian with :math:`\mathrm{Cov}(\theta, \theta_a) = \Sigma` and
    :math:`\mathrm{Cov}(\theta_a) = \Sigma + \eta I`.  The coupling has curvature
    :math:`2/\eta` along :math:`\theta - \theta_a`, so the unadjusted step needs
    :math:`h < \eta` on top of the target's own bound; beyond it the chain diverges and
    ``info.is_finite`` turns ``False``.

    ``init(position, guide=None)`` starts the guide at ``position`` unless given (as the
    authors' code does); ``step(key, state, batch_indices, step_size, coupling)`` with
    ``coupling`` :math:`\eta > 0` traced like the step size; batches from any scheme of
    :mod:`shufflesgd.shuffling` (:func:`shufflesgd.mcmc.run_minibatch_chain` records
    ``state.position``, :math:`\theta`).
    """

    def init(position: PyTree, guide: PyTree | None = None) -> EntropyMCMCState:
        check_float_array("position", position)
        if guide is None:
            guide = position
        check_like("guide", guide, position, "position")
        return EntropyMCMCState(position, guide)

    def step(
        key: jax.Array,
        state: EntropyMCMCState,
        batch: jax.Array,
        step_size: jax.Array,
        coupling: jax.Array,
    ):
        check_key("key", key)
        check_positive("step_size", step_size)
        check_positive("coupling", coupling)
        theta, guide = state
        position_key, guide_key = jax.random.split(key)
        pull = jax.tree.map(lambda a, b: (a - b) / coupling, theta, guide)
        drift = jax.tree.map(lambda g, p: g - p, grad_estimator(theta, batch), pull)
        scale = jnp.sqrt(2.0 * step_size)
        theta = _axpy(scale, _normal_like(position_key, theta), _axpy(step_size, drift, theta))
        guide = _axpy(scale, _normal_like(guide_key, guide), _axpy(step_size, pull, guide))
        new = EntropyMCMCState(theta, guide)
        return new, _info(1.0, True, 1, _all_finite(new))

    return SamplingAlgorithm(init, step)
