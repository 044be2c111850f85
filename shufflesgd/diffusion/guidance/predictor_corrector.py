r"""Predictor–corrector guidance, PCG (Bradley & Nakkiran 2024, "Classifier-Free Guidance is a
Predictor-Corrector", TMLR 2025, Sec. 4, Alg. 1-2): the sampler that CFG is an instance of.

Each step from :math:`t` to :math:`t_{next}` is a DDIM predictor on the *conditional* model
(:func:`shufflesgd.diffusion.samplers.ode.ddim_step`, :math:`\eta = 0`), carrying
:math:`p_t(x \mid c)` to :math:`p_{t_{next}}(x \mid c)`, then ``corrector_steps`` :math:`K`
unadjusted Langevin steps at :math:`t_{next}` on the γ-powered law

.. math:: p_{t,\gamma}(x) \propto p_t(x \mid c)^\gamma\, p_t(x)^{1-\gamma}, \qquad
          \nabla\log p_{t,\gamma} = \gamma\nabla\log p_t(x \mid c)
          + (1-\gamma)\nabla\log p_t(x),

:math:`x \leftarrow x + \epsilon\nabla\log p_{t,\gamma}(x) + \sqrt{2\epsilon}\,z` with
:math:`\epsilon = \kappa\,\sigma(t_{next})^2` (``step_scale`` :math:`\kappa`; the
parameterisation of the step by the noise level is ours, the paper's Algorithm 2 constants could
not be checked offline).  As :math:`K` grows and :math:`\kappa` shrinks, the state at each time
approaches :math:`p_{t,\gamma}`, and at the end of a grid that reaches small noise, the γ-powered
data law :math:`p(x \mid c)^\gamma p(x)^{1-\gamma}` that CFG is often believed to sample and
does not.  The paper proves that in the SDE limit CFG with DDPM is PCG with the exponent
:math:`2\gamma - 1`.  On a Gaussian the Langevin step contracts toward the target's mean with
factor :math:`1 - \epsilon\lambda` along a precision eigenvalue :math:`\lambda\le\max(\gamma,1)/
\sigma_t^2` (larger near the data), so :math:`\kappa < 2/\max(\gamma, 1)` keeps it stable.

Cost: :math:`1 + 2K` network evaluations a step (the predictor's conditional one, then both
branches, batched, per Langevin step), which is what ``info.nfe`` counts; the final step
(``final``) uses the CFG prediction, two more.  :math:`K` draws a step.  The step is affine in
the model output and the noise, so on Gaussian branches the output law is exactly Gaussian
(:func:`shufflesgd.diffusion.exact_gaussian_law`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_int, check_positive_finite
from shufflesgd.diffusion.guidance.conditional import (
    ConditionalModel,
    check_conditional_model,
    check_label,
)
from shufflesgd.diffusion.guidance.transforms import check_scale, classifier_free_guidance
from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import (
    SamplerInfo,
    check_sampler_arguments,
    draw,
    finish,
    scan_grid,
)
from shufflesgd.diffusion.samplers.ode import ddim_step

Array = jax.Array


def predictor_corrector_guidance(
    key: Array,
    model: ConditionalModel,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    label: Array,
    scale: Array,
    corrector_steps: int = 1,
    step_scale: Array = 0.1,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""PCG (Bradley & Nakkiran 2024, Alg. 2): a conditional DDIM predictor and ``corrector_steps``
    Langevin steps of size :math:`\kappa\sigma(t_{next})^2` on the γ-powered law at every grid
    time (module docstring).  ``label`` is the class, ``scale`` :math:`\gamma \ge 0` (traced
    allowed), ``step_scale`` :math:`\kappa > 0` (traced allowed).  ``corrector_steps=0`` is
    conditional DDIM.  Step ``i``'s Langevin step ``j`` uses draw ``j``.  Defaults:
    ``corrector_steps=1``, ``step_scale=0.1``, ``final="denoise"`` (the CFG :math:`x_0`)."""
    check_sampler_arguments(grid, final, x=x, key=key, noise=noise)
    check_conditional_model(model)
    check_label(label)
    check_scale(scale)
    corrector_steps = check_int("corrector_steps", corrector_steps, minimum=0)
    check_positive_finite(step_scale=step_scale)
    conditional = model.given(label)
    zero_draw = jnp.zeros((1, 1, *jnp.shape(x)), jnp.result_type(x))

    def step(x, i, t, t_next):
        # deterministic DDIM (eta = 0): a zero draw, so neither key nor noise is read
        x = ddim_step(None, conditional, sde, 0.0, zero_draw, x, 0, t, t_next)
        epsilon = step_scale * sde.sigma(t_next) ** 2
        for j in range(corrector_steps):
            cond, uncond = model.predict_branches(sde, x, t_next, label, "score")
            score = uncond + scale * (cond - uncond)
            x = x + epsilon * score + jnp.sqrt(2.0 * epsilon) * draw(key, noise, i, j, x)
        return x

    x, nfe, bad = scan_grid(step, x, grid, 1 + 2 * corrector_steps)
    guided = classifier_free_guidance(model, label, scale)
    x, info = finish(guided, sde, x, grid, final, nfe, bad)
    return x, info._replace(nfe=info.nfe + (final != "none"))
