"""Classifier-based feature distillation, CFD (Sun et al. 2022): progressive distillation whose
student also matches a classifier's sharpened class probabilities of the teacher's output.

On a progressive-distillation draw (`progressive.round_pair`: x_t at t_i and the data prediction
x_tgt that makes one student step land on two teacher steps), with c(x) a classifier's logits:

    p     = softmax(c(x_tgt) / tau)        (stop-gradient; tau < 1 sharpens the teacher's)
    q     = softmax(c(D_student(x_t, t)) / tau)
    L     = E [ l2_weight w(lambda_t) mean_D (D_student - x_tgt)^2 + kl_weight tau^2 KL(p || q) ]

The KL term carries the classifier's view of the output (which class, how sure) rather than every
pixel equally; tau^2 keeps its gradient's scale independent of tau (Hinton et al. 2015). With the
student able to reach x_tgt, both terms vanish there: the minimiser is the teacher's two-step map
(tests/test_cfd.py). On an analytic mixture the exact classifier is the component posterior
(`analytic.component_logits`, params: the mixture); for images, a trained classifier's logits.

References:
  Sun et al., Accelerating Diffusion Sampling with Classifier-based Feature Distillation, 2022.
  Salimans & Ho, Progressive Distillation for Fast Sampling of Diffusion Models, ICLR 2022.
  Hinton et al., Distilling the Knowledge in a Neural Network, 2015 (temperature, tau^2).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.losses import _common, dsm, progressive
from diffdistill.method import Method, Update

Array = jax.Array
Apply = Callable[..., Array]


def cfd_loss(student: Apply, teacher: Apply, classifier: Callable[[Any, Array], Array], *,
             schedule: schedules_lib.Schedule, temperature: float = 0.5, kl_weight: float = 1.0,
             l2_weight: float = 1.0, spacing: str = "logsnr", weighting: str = "truncated_snr",
             t_start: float | None = None, t_end: float | None = None):
  """The CFD loss (module docstring).

  Args:
    student, teacher: denoisers `apply(params, x, t, **cond) -> x0_hat` (as in `pd_loss`).
    classifier: `logits(params, x) -> [B, K]` on clean samples.
    temperature: tau > 0 of both softmaxes.
    kl_weight, l2_weight: >= 0, not both 0.

  Returns:
    loss_fn(params, batch, rng, *, teacher_params, classifier_params, num_steps) -> (loss, aux);
    aux: x0_mse, kl, agreement (argmax c(student) == argmax c(target)), nonfinite.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}.")
  if kl_weight < 0 or l2_weight < 0 or kl_weight == l2_weight == 0:
    raise ValueError(f"kl_weight and l2_weight must be >= 0 and not both 0, got {kl_weight!r}, "
                     f"{l2_weight!r}.")
  weight_fn = dsm.x0_weighting(weighting)

  def loss_fn(params: Any, batch: Mapping[str, Array], rng: Array, *, teacher_params: Any,
              classifier_params: Any, num_steps: Array):
    x0 = _common.data(batch)
    b = x0.shape[0]
    i_rng, eps_rng = jax.random.split(rng)
    x_t, t, target = progressive.round_pair(teacher, teacher_params, x0, i_rng, eps_rng,
                                            num_steps=num_steps, schedule=schedule,
                                            spacing=spacing, t_start=t_start, t_end=t_end)
    out = student(params, x_t, t)
    err = jnp.mean(jnp.square(out - target).reshape(b, -1), axis=1)  # [B]
    logits_t = jax.lax.stop_gradient(classifier(classifier_params, target))
    logits_s = classifier(classifier_params, out)
    p = jax.nn.softmax(logits_t / temperature, axis=-1)
    kl = jnp.sum(p * (jax.nn.log_softmax(logits_t / temperature, axis=-1)
                      - jax.nn.log_softmax(logits_s / temperature, axis=-1)), axis=-1)  # [B]
    terms = l2_weight * weight_fn(schedule.logsnr(t)) * err + kl_weight * temperature ** 2 * kl
    agree = jnp.mean(jnp.argmax(logits_s, -1) == jnp.argmax(logits_t, -1))
    return jnp.mean(terms), {"x0_mse": jnp.mean(err), "kl": jnp.mean(kl), "agreement": agree,
                             "nonfinite": jnp.sum(~jnp.isfinite(terms))}

  return loss_fn


def classifier_feature_distillation(student: Apply, teacher: Apply, classifier: Callable,
                                    **options) -> Method:
  """CFD as a method: frozen inputs `teacher`, `classifier` (its params) and `num_steps`."""
  return Method(name="cfd", updates=(Update(
      player="student", loss_fn=cfd_loss(student, teacher, classifier, **options),
      inputs={"teacher_params": "frozen/teacher", "classifier_params": "frozen/classifier",
              "num_steps": "frozen/num_steps"}),))


__all__ = ["cfd_loss", "classifier_feature_distillation"]
