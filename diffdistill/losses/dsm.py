"""Denoising score matching, the teacher's training loss, in any output parametrization.

With x_t = alpha(t) x0 + sigma(t) eps, t ~ p(t), eps ~ N(0, I), every weighting here is defined
on the x0 error, as a function of the logSNR lambda(t) only (Kingma & Gao 2023's view: the
objectives differ only by a weight w(lambda)):

    L = E_{t, x0, eps} [ q(t) w(lambda(t)) mean_D (D(x_t, t) - x0)^2 ],

q(t) = p_target(t) / p(t) an optional importance weight. The network of `kind` predicts
out = F(x_t, t) with D = A(t) x_t + c(t) F (parametrization.to_x0 is affine in the output),
and its regression target is from_x0(x0, x_t, t). Since D - x0 = c(t) (F - target) coordinate-wise,
the loss is computed in the network's own output space with

    L = E [ q(t) w(lambda) c(t)^2 mean_D (F - target)^2 ],                                   (*)

which is the same number. c(t)^2 per kind (sh = sigma/alpha, sd = sigma_data, ' = d/dt):

    x0: 1    eps: sigma^2/alpha^2 = e^-lambda    v: sigma^2/(alpha^2 + sigma^2)^2
    flow: sigma^2/(sigma alpha' - sigma' alpha)^2    score: sigma^4/alpha^2
    edm: c_out^2 = sh^2 sd^2/(sh^2 + sd^2)

c(t) is read off `parametrization.to_x0` itself (its value at x = 0, out = 1), so the two cannot
disagree. The named x0 weightings w(lambda), SNR = e^lambda:

    uniform        1                               plain x0 regression
    snr            SNR                             = eps-MSE (Ho et al. 2020's L_simple)
    truncated_snr  max(SNR, 1)                     Salimans & Ho 2022
    min_snr_gamma  min(SNR, gamma)                 Hang et al. 2023 (gamma = 5)
    edm            SNR + 1/sd^2                    Karras et al. 2022's lambda(sigma) = (sh^2 + sd^2)/(sh sd)^2
    v              SNR + 1                         = v-MSE on VP schedules (Salimans & Ho 2022's "SNR+1")

so e.g. (eps, snr), (v, v) on a VP schedule and (edm, edm) all train with unit weight on the
network's output error. The EDM weighting acts on the scale-free state x/alpha at sh = sigma/alpha,
which is why it is a function of lambda alone.

Classifier-free guidance training (Ho & Salimans 2022): with cond_drop_prob = p, each example's
label is replaced by `null_label` with probability p.

References:
  Vincent, A Connection Between Score Matching and Denoising Autoencoders, 2011.
  Ho et al., Denoising Diffusion Probabilistic Models, NeurIPS 2020.
  Salimans & Ho, Progressive Distillation for Fast Sampling of Diffusion Models, ICLR 2022 (Sec. 4).
  Hang et al., Efficient Diffusion Training via Min-SNR Weighting Strategy, ICCV 2023.
  Karras et al., Elucidating the Design Space of Diffusion Models, NeurIPS 2022 (Eq. 8, Table 1).
  Kingma & Gao, Understanding Diffusion Objectives as the ELBO with Simple Data Augmentation,
  NeurIPS 2023.
  Ho & Salimans, Classifier-Free Diffusion Guidance, 2022.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import _validate
from diffdistill import parametrization
from diffdistill import schedules as schedules_lib

Array = jax.Array

DEFAULT_LOGSNR_BIN_EDGES = (-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0)  # 8 bins, open at both ends


def _uniform(lam, *, gamma, sigma_data):
  del gamma, sigma_data
  return jnp.ones_like(lam)


def _snr(lam, *, gamma, sigma_data):
  del gamma, sigma_data
  return jnp.exp(lam)


def _truncated_snr(lam, *, gamma, sigma_data):
  del gamma, sigma_data
  return jnp.maximum(jnp.exp(lam), 1.0)


def _min_snr_gamma(lam, *, gamma, sigma_data):
  del sigma_data
  return jnp.minimum(jnp.exp(lam), gamma)


def _edm(lam, *, gamma, sigma_data):
  del gamma
  return jnp.exp(lam) + 1.0 / (sigma_data * sigma_data)


def _v(lam, *, gamma, sigma_data):
  del gamma, sigma_data
  return jnp.exp(lam) + 1.0


WEIGHTINGS: dict[str, Callable[..., Array]] = {
    "uniform": _uniform, "snr": _snr, "truncated_snr": _truncated_snr,
    "min_snr_gamma": _min_snr_gamma, "edm": _edm, "v": _v,
}


def x0_weighting(name: str, *, gamma: float = 5.0, sigma_data: float = 0.5) -> Callable[[Array], Array]:
  """The weight w(lambda) on the x0 error of the named weighting (table in the module docstring)."""
  if name not in WEIGHTINGS:
    raise ValueError(f"Unknown weighting {name!r}; expected one of {sorted(WEIGHTINGS)}.")
  if gamma <= 0:
    raise ValueError(f"min_snr_gamma must be > 0, got {gamma}.")
  if sigma_data <= 0:
    raise ValueError(f"sigma_data must be > 0, got {sigma_data}.")
  fn = WEIGHTINGS[name]
  return lambda lam: fn(lam, gamma=gamma, sigma_data=sigma_data)


def output_to_x0_scale(t: Array, *, kind: str, schedule: schedules_lib.Schedule,
                       sigma_data: float | None = None) -> Array:
  """c(t) in D = A(t) x + c(t) F for a network of `kind`: to_x0 at x = 0, out = 1. [B] -> [B]."""
  t = jnp.asarray(t)
  ones = jnp.ones(t.shape + (1,), t.dtype)
  return parametrization.to_x0(ones, jnp.zeros_like(ones), t, kind=kind, schedule=schedule,
                               sigma_data=sigma_data)[:, 0]


def _binned_mean(values: Array, lam: Array, edges: Array, valid: Array) -> tuple[Array, Array]:
  """Per-bin mean of values [B] over logSNR bins (0 where empty) and the bin counts, each [K],
  over the examples where `valid` [B] holds."""
  onehot = jax.nn.one_hot(jnp.searchsorted(edges, lam), edges.shape[0] + 1, dtype=values.dtype)  # [B, K]
  onehot = onehot * valid[:, None]
  counts = onehot.sum(axis=0)
  # Zeroed, not only zero-weighted: 0 * NaN is NaN, and the matmul mixes every example into
  # every bin, so one non-finite example would turn every occupied bin into NaN.
  sums = onehot.T @ jnp.where(valid, values, 0.0)
  return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0), counts


def dsm_loss(apply: Callable[..., Array], *, schedule: schedules_lib.Schedule, kind: str,
             weighting: str = "snr", time_sampler: schedules_lib.TimeSampler | str = "uniform",
             importance_target: schedules_lib.TimeSampler | str | None = None,
             min_snr_gamma: float = 5.0, cond_drop_prob: float = 0.0, null_label: int | None = None,
             sigma_data: float | None = None, dropout: bool = False,
             logsnr_bin_edges=DEFAULT_LOGSNR_BIN_EDGES) -> Callable[..., tuple[Array, dict]]:
  """Denoising score matching loss (*) of the module docstring for a raw network `apply`.

  Args:
    apply: the raw network `apply(params, x_in, t_in, **cond) -> out` (e.g. nets.make_apply);
      it sees parametrization.net_inputs (x_t and t, or EDM's c_in x_t / alpha and c_noise).
    schedule: the forward process.
    kind: the network's output, one of parametrization.KINDS.
    weighting: the x0 weighting w(lambda), one of WEIGHTINGS.
    time_sampler: the distribution t is drawn from (a schedules.TimeSampler or its name).
    importance_target: if given, each term is multiplied by p_target(t) / p(t), so the loss is an
      unbiased estimate of the loss under `importance_target`'s times.
    min_snr_gamma: gamma of the 'min_snr_gamma' weighting.
    cond_drop_prob: probability of replacing an example's label by `null_label` (CFG training).
    null_label: the null class (num_classes for nets' class-conditional networks).
    sigma_data: data scale for kind 'edm' and the 'edm' weighting (default:
      parametrization.resolve_sigma_data).
    dropout: if True, apply also gets `dropout_rng=` a fresh key (nets.make_apply's contract), so
      the network's dropout is active.
    logsnr_bin_edges: increasing edges e_1 < ... < e_{K-1} of the K logging bins
      (-inf, e_1), [e_1, e_2), ..., [e_{K-1}, inf). Also `loss_fn.logsnr_bin_edges`.

  Returns:
    loss_fn(params, batch, rng) -> (loss, aux), batch = {"x": [B, ...], optional "label": [B]}.
    The noise, times and dropped labels are drawn from `rng` with batch-shaped draws, so under jit
    with a sharded batch they do not depend on the device count. aux holds scalars
      x0_mse       mean_D (D - x0)^2 averaged over the batch (unweighted),
      out_mse      mean_D (F - target)^2 averaged over the batch (unweighted),
      weight_mean  mean of q w c^2, the effective weight on the output error,
      nonfinite    number of examples whose term is not finite (left out of the bins; the loss
                   itself is then not finite, so the step is skipped or the run stops),
      cond_drop_frac (when labels are given) the fraction of null labels fed to the network,
    and per logSNR bin ([K] arrays) `bin_loss` (mean term, 0 where empty), `bin_x0_mse` and
    `bin_count`, over the finite examples only; the mean over several steps is
    sum(bin_loss * bin_count) / sum(bin_count).
  """
  parametrization.check_kind(kind)
  schedule = schedules_lib.resolve(schedule)
  sd = parametrization.resolve_sigma_data(schedule, sigma_data)
  weight_fn = x0_weighting(weighting, gamma=min_snr_gamma, sigma_data=sd)
  sampler = schedules_lib.resolve_time_sampler(time_sampler, "time_sampler")
  target = None if importance_target is None else schedules_lib.resolve_time_sampler(importance_target,
                                                                   "importance_target")
  if not 0.0 <= cond_drop_prob <= 1.0:
    raise ValueError(f"cond_drop_prob must lie in [0, 1], got {cond_drop_prob}.")
  if cond_drop_prob > 0 and null_label is None:
    raise ValueError("cond_drop_prob > 0 needs null_label (the null class, e.g. num_classes).")
  edges_np = np.asarray(logsnr_bin_edges, np.float32)
  if edges_np.ndim != 1 or edges_np.size < 1 or np.any(np.diff(edges_np) <= 0):
    raise ValueError(f"logsnr_bin_edges must be a non-empty increasing 1-D sequence, got "
                     f"{logsnr_bin_edges!r}.")

  def loss_fn(params: Any, batch: Mapping[str, Array], rng: Array) -> tuple[Array, dict]:
    if "x" not in batch:
      raise ValueError(f"batch must hold 'x' (and optionally 'label'); got keys {sorted(batch)}.")
    rng = _validate.check_key("rng", rng)
    x0 = jnp.asarray(batch["x"])  # [B, ...]
    if x0.ndim < 2:
      raise ValueError(f"batch['x'] must have shape [B, ...], got {x0.shape}.")
    # Times, noise and the loss in at least float32, whatever the storage dtype of the data.
    x0 = x0.astype(jnp.promote_types(x0.dtype, jnp.float32))
    b = x0.shape[0]
    t_rng, eps_rng, drop_rng, net_rng = jax.random.split(rng, 4)
    t = sampler.sample(t_rng, (b,), schedule=schedule, dtype=x0.dtype)  # [B]
    eps = jax.random.normal(eps_rng, x0.shape, x0.dtype)
    tb = schedules_lib.broadcast_to(t, x0)
    x_t = schedule.alpha(tb) * x0 + schedule.sigma(tb) * eps

    cond, aux = {}, {}
    label = batch.get("label")
    if label is not None:
      label = jnp.asarray(label)
      if label.shape != (b,):
        raise ValueError(f"batch['label'] must have shape [B] = [{b}], got {label.shape}.")
      if cond_drop_prob > 0:
        drop = jax.random.bernoulli(drop_rng, cond_drop_prob, (b,))
        label = jnp.where(drop, jnp.asarray(null_label, label.dtype), label)
      if null_label is not None:
        aux["cond_drop_frac"] = jnp.mean((label == null_label).astype(x0.dtype))
      cond["label"] = label
    elif cond_drop_prob > 0:
      raise ValueError("cond_drop_prob > 0 but the batch has no 'label'.")
    if dropout:
      cond["dropout_rng"] = net_rng

    x_in, t_in = parametrization.net_inputs(x_t, t, kind=kind, schedule=schedule, sigma_data=sd)
    out = apply(params, x_in, t_in, **cond)
    if out.shape != x0.shape:
      raise ValueError(f"network output shape {out.shape} does not match batch['x'] {x0.shape}.")
    target_out = parametrization.from_x0(x0, x_t, t, kind=kind, schedule=schedule, sigma_data=sd)
    out_err = jnp.mean(jnp.square(out.astype(x0.dtype) - target_out).reshape(b, -1), axis=1)  # [B]

    lam = schedule.logsnr(t)  # [B]
    c = output_to_x0_scale(t, kind=kind, schedule=schedule, sigma_data=sd)  # [B]
    x0_err = c * c * out_err  # [B] = mean_D (D - x0)^2
    weight = weight_fn(lam) * c * c
    if target is not None:
      weight = weight * schedules_lib.importance_weight(t, target=target, proposal=sampler,
                                                        schedule=schedule)
    terms = weight * out_err  # [B]
    loss = jnp.mean(terms)

    edges = jnp.asarray(edges_np, lam.dtype)
    finite = jnp.isfinite(terms) & jnp.isfinite(x0_err)  # [B]; the rest is counted in nonfinite
    aux["bin_loss"], aux["bin_count"] = _binned_mean(terms, lam, edges, finite)
    aux["bin_x0_mse"], _ = _binned_mean(x0_err, lam, edges, finite)
    aux["x0_mse"] = jnp.mean(x0_err)
    aux["out_mse"] = jnp.mean(out_err)
    aux["weight_mean"] = jnp.mean(weight)
    aux["nonfinite"] = jnp.sum(~jnp.isfinite(terms))
    return loss, aux

  loss_fn.logsnr_bin_edges = tuple(float(e) for e in edges_np)
  return loss_fn


__all__ = ["WEIGHTINGS", "DEFAULT_LOGSNR_BIN_EDGES", "x0_weighting", "output_to_x0_scale",
           "dsm_loss"]
