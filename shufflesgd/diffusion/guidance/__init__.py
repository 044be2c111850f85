r"""Conditional models and guidance: the conditional path from a class label to a guided sample.

* ``conditional.py``: :class:`ConditionalModel` (``fn(x, t, label)``, both branches in one
  batched call, :data:`NULL_LABEL` for the unconditional one) and the exact conditional model
  of a class-conditional Gaussian mixture;
* ``transforms.py``: guidance as a model transform, for any sampler: classifier-free guidance,
  guidance rescale, adaptive guidance, APG, by name in :data:`GUIDANCE`;
* ``predictor_corrector.py``: CFG as a predictor–corrector (PCG), the sampler whose corrector
  targets the γ-powered law :math:`p_t(x \mid c)^\gamma p_t(x)^{1-\gamma}`.
"""

from shufflesgd.diffusion.guidance.conditional import (
    NULL_LABEL,
    ConditionalModel,
    check_label,
    conditional_mixture_model,
)
from shufflesgd.diffusion.guidance.predictor_corrector import predictor_corrector_guidance
from shufflesgd.diffusion.guidance.transforms import (
    GUIDANCE,
    adaptive_guidance,
    classifier_free_guidance,
    guidance_is_off,
    guided_model,
    projected_guidance,
    rescaled_guidance,
)

__all__ = [
    "GUIDANCE",
    "NULL_LABEL",
    "ConditionalModel",
    "adaptive_guidance",
    "check_label",
    "classifier_free_guidance",
    "conditional_mixture_model",
    "guidance_is_off",
    "guided_model",
    "predictor_corrector_guidance",
    "projected_guidance",
    "rescaled_guidance",
]
