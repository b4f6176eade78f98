"""Consistency trajectory models (Kim et al. 2024): g(x, t, s) from the copy (s zero-initialized)
jumps anywhere along the PF-ODE; trained against the EMA target through the teacher's Heun (or
DDIM) steps t -> u, plus a DSM term, and optionally a GAN term (a linear head on the frozen copy's
trunk features, a "discriminator" player).

Loss: `losses.ctm.consistency_trajectory_model`. Sampler: gamma-sampling (gamma 0: deterministic
jumps) with 1 or 2 calls.
"""

from __future__ import annotations

import jax

from diffdistill import nets
from diffdistill.losses import ctm as ctm_lib
from diffdistill.losses import dmd2 as dmd2_lib
from diffdistill.methods import _common, _consistency, plan as plan_lib

# max_solver_steps 0 = up to s; gamma of the sampler (0: deterministic); gan_weight > 0 adds the
# GAN term from step gan_start
CONFIG = {**_consistency.SECTION,
          "ctm": dict(num_steps=4000, num_intervals=32, solver="heun", mu=0.95, distance="l2",
                      dsm_weight=1.0, max_solver_steps=0, gamma=0.0, gan_weight=0.0, gan_start=0)}
SETTINGS = {}
TESTBEDS = {"digits": "ctm needs a student network with an s input (the MLP): the digits "
                      "teacher's U-Net has no s input yet; ctm runs on ring2d and gmm64."}
TINY = {"ctm.num_steps": 20, "ctm.num_intervals": 4}
EXTRA_COND = ("s",)


def sampler(net, *, t_start: float, t_end: float, mid_sigma: float = 0.8, gamma: float = 0.0):
  """gamma-sampling of g = net.denoise(params, x, t, s=s) with nfe 1 or 2 calls."""
  G = ctm_lib.trajectory_function(net.denoise, schedule=net.schedule)
  t_mid = _consistency.mid_time(net.schedule, mid_sigma)

  def sample(params, x, *, nfe, rng=None, **cond):
    rng = jax.random.key(0) if rng is None else rng
    return ctm_lib.gamma_sample(G, params, x, schedule=net.schedule,
                                times=tuple(_consistency.times("ctm", nfe, t_start, t_mid)),
                                gamma=gamma, rng=rng, t_end=t_end, **cond)
  return sample


def build(config, setup):
  c, cc = config.ctm, config.consistency
  _common.check_positive(c, "ctm", ("num_steps", "num_intervals"))
  if setup.teacher.module is not None:
    raise ValueError(TESTBEDS["digits"])
  step = _consistency.solver_step("ctm", c.solver)
  net, stages, init = _consistency.setup_student(config, setup)
  g_net = _common.make_net(config, net.schedule, setup.teacher.example_shape, extra_cond=EXTRA_COND)
  gan = {}
  if c.gan_weight:  # the discriminator reads the (frozen) network copy's trunk
    features, feature_dim = nets.trunk_features(net)
    gan = dict(gan_weight=c.gan_weight, features=features, gan_start=c.gan_start)
  fresh = g_net.init(jax.random.key(config.seed + 4))
  method = ctm_lib.consistency_trajectory_model(
      g_net.denoise, setup.teacher.apply, ema_target=c.mu > 0, schedule=net.schedule,
      solver_step=step, num_steps=c.num_intervals, spacing=cc.spacing,
      max_solver_steps=c.max_solver_steps or None, distance=c.distance, dsm_weight=c.dsm_weight,
      t_start=setup.t_start, t_end=setup.t_end, **gan)
  stage = _common.single_stage(config, setup, "ctm", method, c.num_steps, init,
                               ema={"target": c.mu} if c.mu > 0 else None,
                               params=lambda r: nets.init_from(fresh, init(r)))
  if c.gan_weight:  # + the discriminator's head, on the frozen copy's trunk features
    players, frozen = stage.players, stage.frozen
    stage.players = lambda r: {**players(r), "discriminator": plan_lib.make_player(
        config.optim, dmd2_lib.init_linear_head(feature_dim), num_steps=c.num_steps)}
    stage.frozen = lambda r: {**frozen(r), "features": init(r)}
  stages.append(stage)
  sample = sampler(g_net, t_start=setup.t_start, t_end=setup.t_end, mid_sigma=cc.mid_sigma,
                   gamma=c.gamma)
  students = [plan_lib.Student(name="ctm", nfe=k, params=lambda r: r["ctm"]["student"],
                               sample=sample) for k in cc.nfes]
  return plan_lib.Plan(stages=stages, students=students)
