"""Consistency-model and flow-map recipes: CD, CT, iCT, ECT, sCD, MeanFlow, shortcut models and CTM.

Each `build_*(config, setup) -> Plan`. Every student starts from the teacher's weights, or, for an
analytic teacher, from the `copy` stage's network fit (`trajectory.initial_params`), as the
papers initialize CD, ECT and sCD from the pretrained diffusion model (CT and iCT start from the
copy too here: a fair comparison at CPU scale). Students are evaluated with 1 and 2 steps
(`config.consistency.nfes`): multistep consistency sampling for CD/CT/iCT/ECT/sCD, the k-step
average-velocity sampler for MeanFlow, k-step shortcut sampling (d = 1/k) for shortcut models.

Schedules: CD/CT/iCT/ECT use the teacher's (VP-linear for the analytic testbeds); sCD needs a
TrigFlow teacher, MeanFlow and shortcut models a rectified-flow one (`config._method` sets them).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from diffdistill import nets
from diffdistill import schedules as schedules_lib
from diffdistill import solvers
from diffdistill.losses import consistency as cm
from diffdistill.losses import ctm as ctm_lib
from diffdistill.losses import dmd2 as dmd2_lib
from diffdistill.losses import meanflow as mf
from diffdistill.losses import scm
from diffdistill.losses import shortcut as sc
from experiments.distill import common
from experiments.distill.recipes import trajectory

SOLVER_STEPS = {"ddim": solvers.ddim_step, "heun": solvers.heun_step}


def _mid_time(schedule, sigma_hat: float) -> float:
  """The time where sigma / alpha = sigma_hat (2-step sampling's intermediate time)."""
  t = float(schedule.t_from_logsnr(jnp.float32(-2.0 * jnp.log(sigma_hat))))
  return min(max(t, float(schedule.t_min)), float(schedule.t_max))


def _times(setup, nfe: int, t_mid: float) -> list[float]:
  if nfe == 1:
    return [setup.t_start]
  if nfe == 2:
    return [setup.t_start, t_mid]
  raise ValueError(f"consistency.nfes takes 1 or 2 steps, got {nfe}.")


def _cm_students(name, f, setup, stage, nfes, t_mid):
  schedule = setup.teacher.schedule
  return [common.Student(
      name=name, nfe=k, params=lambda r: r[stage]["student"],
      run=functools.partial(_run_multistep, f, schedule=schedule,
                            times=tuple(_times(setup, k, t_mid)), t_end=setup.t_end))
          for k in nfes]


def _run_multistep(f, params, x, *, schedule, times, t_end):
  return cm.multistep_sample(f, params, x, schedule=schedule, times=times,
                             rng=jax.random.key(0), t_end=t_end)


def _single_stage(config, setup, name, method, num_steps, init, *, ema=None, params=None):
  return common.Stage(
      name=name, method=method, num_steps=num_steps,
      players=lambda r: {"student": common.make_player(
          config.optim, (params or init)(r), num_steps=num_steps,
          ema={"eval": config.eval_ema, **(ema or {})})},
      frozen=lambda r: {"teacher": setup.teacher.params},
      data=lambda r, d: setup.data(config.seed + 20))


def _consistency_setup(config, setup):
  net = trajectory.student_net(config, setup)
  stages: list[common.Stage] = []
  init = trajectory.initial_params(setup, stages, net)
  c = config.consistency
  f = cm.consistency_function(net.denoise, schedule=net.schedule, t_min=setup.t_end)
  t_mid = _mid_time(net.schedule, c.mid_sigma)
  return net, stages, init, f, t_mid


def build_cd(config, setup) -> common.Plan:
  """Consistency distillation with the teacher's Heun (or DDIM) step, EMA target mu."""
  c, cc = config.cd, config.consistency
  net, stages, init, f, t_mid = _consistency_setup(config, setup)
  if c.solver not in SOLVER_STEPS:
    raise ValueError(f"cd.solver must be one of {sorted(SOLVER_STEPS)}, got {c.solver!r}.")
  method = cm.consistency_distillation(
      f, setup.teacher.apply, ema_target=c.mu > 0, schedule=net.schedule,
      solver_step=SOLVER_STEPS[c.solver], num_steps=c.num_intervals, spacing=cc.spacing,
      distance=c.distance, t_start=setup.t_start, t_end=setup.t_end)
  stages.append(_single_stage(config, setup, "cd", method, c.num_steps, init,
                              ema={"target": c.mu} if c.mu > 0 else None))
  return common.Plan(stages=stages, students=_cm_students("cd", f, setup, "cd", cc.nfes, t_mid))


def build_ct(config, setup) -> common.Plan:
  """Consistency training with the N(k) and mu(k) curricula (Song et al. 2023)."""
  c, cc = config.ct, config.consistency
  net, stages, init, f, t_mid = _consistency_setup(config, setup)
  n_fn = functools.partial(cm.ct_num_steps, total_steps=c.num_steps, s0=c.s0, s1=c.s1)
  method = cm.consistency_training(
      f, ema_target=True, schedule=net.schedule, num_steps=n_fn, spacing=cc.spacing,
      distance=c.distance, t_start=setup.t_start, t_end=setup.t_end)
  stages.append(_single_stage(config, setup, "ct", method, c.num_steps, init, ema={
      "target": cm.ct_mu(total_steps=c.num_steps, mu0=c.mu0, s0=c.s0, s1=c.s1)}))
  return common.Plan(stages=stages, students=_cm_students("ct", f, setup, "ct", cc.nfes, t_mid))


def build_ict(config, setup) -> common.Plan:
  """iCT: pseudo-Huber, 1/delta-sigma weights, lognormal intervals, N doubling, no EMA target."""
  c, cc = config.ict, config.consistency
  net, stages, init, f, t_mid = _consistency_setup(config, setup)
  n_fn = functools.partial(cm.ict_num_steps, total_steps=c.num_steps, s0=c.s0, s1=c.s1)
  method = cm.consistency_training(
      f, ema_target=False, name="ict", schedule=net.schedule, num_steps=n_fn, spacing="karras",
      distance="pseudo_huber", weighting="inverse_delta_sigma", lognormal=(c.p_mean, c.p_std),
      max_intervals=c.s1, t_start=setup.t_start, t_end=setup.t_end)
  stages.append(_single_stage(config, setup, "ict", method, c.num_steps, init))
  return common.Plan(stages=stages, students=_cm_students("ict", f, setup, "ict", cc.nfes, t_mid))


def build_ect(config, setup) -> common.Plan:
  """ECT from the teacher copy: the continuous gap halves every stage_steps."""
  c, cc = config.ect, config.consistency
  net, stages, init, f, t_mid = _consistency_setup(config, setup)
  method = cm.easy_consistency_tuning(f, schedule=net.schedule, stage_steps=c.stage_steps,
                                      p_mean=c.p_mean, p_std=c.p_std, distance=c.distance)
  stages.append(_single_stage(config, setup, "ect", method, c.num_steps, init))
  return common.Plan(stages=stages, students=_cm_students("ect", f, setup, "ect", cc.nfes, t_mid))


def build_scd(config, setup) -> common.Plan:
  """sCD on a TrigFlow teacher: the student is the copy's flow network plus a log-variance head."""
  c, cc = config.scd, config.consistency
  schedule = setup.teacher.schedule
  if not isinstance(schedule, schedules_lib.TrigFlow) or config.student.kind != "flow":
    raise ValueError("scd needs config.teacher.schedule='trigflow' and config.student.kind='flow'.")
  net = trajectory.student_net(config, setup)
  stages: list[common.Stage] = []
  init = trajectory.initial_params(setup, stages, net)
  method = scm.scm(net.apply, setup.teacher.apply, schedule=schedule, p_mean=c.p_mean,
                   p_std=c.p_std, tangent_normalization=c.tangent_normalization or None,
                   warmup_steps=c.warmup_steps, adaptive_weighting=True)
  stages.append(_single_stage(
      config, setup, "scd", method, c.num_steps, init,
      params=lambda r: {"net": init(r), "logvar": scm.logvar_init(c.logvar_features)}))
  f = scm.consistency_function(net.apply)

  def run(params, x, *, times):
    # the last state's noise carries on to t_end (a DDIM step from t = 0 data to t_end),
    # since sCM's f maps to t = 0 and the reference is the flow map to t_end
    b = x.shape[0]
    x0 = t_in = None  # set by the first iteration, read from the second on
    for i, t in enumerate(times):
      if i:
        z = jax.random.normal(jax.random.fold_in(jax.random.key(0), i), x.shape, x.dtype)
        x = jnp.cos(t) * x0 + jnp.sin(t) * schedule.sigma_data * z
      t_in = t
      x0 = f(params, x, jnp.full((b,), t, x.dtype))
    eps = (x - jnp.cos(t_in) * x0) / (schedule.sigma_data * jnp.sin(t_in))
    return schedule.alpha(jnp.float32(setup.t_end)) * x0 + schedule.sigma(
        jnp.float32(setup.t_end)) * eps

  students = [common.Student(
      name="scd", nfe=k, params=lambda r: r["scd"]["student"]["net"],
      run=functools.partial(run, times=tuple([setup.t_start] if k == 1 else
                                             [setup.t_start, c.t_mid])))
              for k in cc.nfes]
  return common.Plan(stages=stages, students=students)


def build_meanflow(config, setup) -> common.Plan:
  """MeanFlow distillation on a rectified-flow teacher: u(z, r, t) from the copy (r zero-init)."""
  c, cc = config.meanflow, config.consistency
  schedule = setup.teacher.schedule
  if not isinstance(schedule, schedules_lib.RectifiedFlow) or config.student.kind != "flow":
    raise ValueError("meanflow needs config.teacher.schedule='rectified_flow' and "
                     "config.student.kind='flow'.")
  net = trajectory.student_net(config, setup)
  stages: list[common.Stage] = []
  init = trajectory.initial_params(setup, stages, net)
  u_net = common.make_net(config, schedule, setup.teacher.example_shape, extra_cond=("r",))
  fresh = u_net.init(jax.random.key(config.seed + 3))
  method = mf.meanflow(u_net.apply, setup.teacher.apply if c.teacher_velocity else None,
                       schedule=schedule, p_mean=c.p_mean, p_std=c.p_std,
                       ratio_r_neq_t=c.ratio_r_neq_t, adaptive_p=c.adaptive_p)
  stage = _single_stage(config, setup, "meanflow", method, c.num_steps, init,
                        params=lambda r: nets.init_from(fresh, init(r)))
  if not c.teacher_velocity:
    stage.frozen = lambda r: None
  stages.append(stage)

  def run(params, x, *, times):
    return mf.meanflow_sample(u_net.apply, params, x, times=times)

  students = [common.Student(
      name="meanflow", nfe=k, params=lambda r: r["meanflow"]["student"],
      run=functools.partial(run, times=tuple([setup.t_start, setup.t_end] if k == 1 else
                                             [setup.t_start, c.t_mid, setup.t_end])))
              for k in cc.nfes]
  return common.Plan(stages=stages, students=students)


def build_shortcut(config, setup) -> common.Plan:
  """Shortcut models on a rectified-flow teacher: s(x, t, d) from the copy (d zero-init), the
  flow-matching part at d = 0 (the teacher's velocity, or eps - x0), the self-consistency part
  against the student's EMA "target" copy."""
  c, cc = config.shortcut, config.consistency
  schedule = setup.teacher.schedule
  if not isinstance(schedule, schedules_lib.RectifiedFlow) or config.student.kind != "flow":
    raise ValueError("shortcut needs config.teacher.schedule='rectified_flow' and "
                     "config.student.kind='flow'.")
  if setup.t_start != 1.0:
    raise ValueError(f"shortcut samples from t = 1 (schedule t_max = 1), got t_start="
                     f"{setup.t_start}.")
  net = trajectory.student_net(config, setup)
  stages: list[common.Stage] = []
  init = trajectory.initial_params(setup, stages, net)
  s_net = common.make_net(config, schedule, setup.teacher.example_shape, extra_cond=("d",))
  fresh = s_net.init(jax.random.key(config.seed + 3))
  method = sc.shortcut(s_net.apply, setup.teacher.apply if c.teacher_velocity else None,
                       ema_decay=c.ema, schedule=schedule,
                       bootstrap_fraction=c.bootstrap_fraction, num_base_steps=c.num_base_steps)
  stage = _single_stage(config, setup, "shortcut", method, c.num_steps, init,
                        ema={"target": c.ema}, params=lambda r: nets.init_from(fresh, init(r)))
  if not c.teacher_velocity:
    stage.frozen = lambda r: None
  stages.append(stage)

  def run(params, x, *, num_steps):
    return sc.shortcut_sample(s_net.apply, params, x, num_steps=num_steps, t_end=setup.t_end)

  students = [common.Student(name="shortcut", nfe=k, params=lambda r: r["shortcut"]["student"],
                             run=functools.partial(run, num_steps=k)) for k in cc.nfes]
  return common.Plan(stages=stages, students=students)


def build_ctm(config, setup) -> common.Plan:
  """CTM (Kim et al. 2024): g(x, t, s) from the copy (s zero-initialized), the teacher's Heun (or
  DDIM) steps t -> u, EMA target mu, DSM term; gamma-sampling at 1 and 2 steps."""
  c, cc = config.ctm, config.consistency
  if setup.teacher.module is not None:
    raise ValueError("ctm needs a student network with extra_cond=('s',) (the MLP): a trained "
                     "teacher's own architecture (the digits U-Net) has no s input yet.")
  if c.solver not in SOLVER_STEPS:
    raise ValueError(f"ctm.solver must be one of {sorted(SOLVER_STEPS)}, got {c.solver!r}.")
  net, stages, init, _, t_mid = _consistency_setup(config, setup)
  g_net = common.make_net(config, net.schedule, setup.teacher.example_shape, extra_cond=("s",))
  gan = {}
  if c.gan_weight:  # the discriminator reads the (frozen) network copy's trunk
    features, feature_dim = common.trunk_features(net)
    gan = dict(gan_weight=c.gan_weight, features=features, gan_start=c.gan_start)
  fresh = g_net.init(jax.random.key(config.seed + 4))
  method = ctm_lib.consistency_trajectory_model(
      g_net.denoise, setup.teacher.apply, ema_target=c.mu > 0, schedule=net.schedule,
      solver_step=SOLVER_STEPS[c.solver], num_steps=c.num_intervals, spacing=cc.spacing,
      max_solver_steps=c.max_solver_steps or None, distance=c.distance, dsm_weight=c.dsm_weight,
      t_start=setup.t_start, t_end=setup.t_end, **gan)
  stage = _single_stage(config, setup, "ctm", method, c.num_steps, init,
                        ema={"target": c.mu} if c.mu > 0 else None,
                        params=lambda r: nets.init_from(fresh, init(r)))
  if c.gan_weight:  # + the discriminator's head, on the frozen copy's trunk features
    players, frozen = stage.players, stage.frozen
    stage = dataclasses.replace(
        stage,
        players=lambda r: {**players(r), "discriminator": common.make_player(
            config.optim, dmd2_lib.init_linear_head(feature_dim), num_steps=c.num_steps)},
        frozen=lambda r: {**frozen(r), "features": init(r)})
  stages.append(stage)
  G = ctm_lib.trajectory_function(g_net.denoise, schedule=net.schedule)

  def run(params, x, *, times):
    return ctm_lib.gamma_sample(G, params, x, schedule=net.schedule, times=times, gamma=c.gamma,
                                rng=jax.random.key(0), t_end=setup.t_end)

  students = [common.Student(name="ctm", nfe=k, params=lambda r: r["ctm"]["student"],
                             run=functools.partial(run, times=tuple(_times(setup, k, t_mid))))
              for k in cc.nfes]
  return common.Plan(stages=stages, students=students)


RECIPES = {"cd": build_cd, "ct": build_ct, "ict": build_ict, "ect": build_ect, "scd": build_scd,
           "meanflow": build_meanflow, "shortcut": build_shortcut, "ctm": build_ctm}

__all__ = ["RECIPES", "build_cd", "build_ct", "build_ict", "build_ect", "build_scd",
           "build_meanflow", "build_shortcut", "build_ctm"]
