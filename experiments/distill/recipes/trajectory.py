"""Trajectory distillation recipes: progressive distillation, knowledge distillation, reflow.

Each `build_*(config, setup) -> Plan`. Students start from the teacher's weights; an analytic
teacher has none, so its plan opens with a `copy` stage that fits a network to the exact
denoiser (`losses.kd.copy_loss`), and every student starts from that copy.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import solvers
from diffdistill import schedules as schedules_lib
from diffdistill.data import pairs as pairs_lib, pipeline
from diffdistill.losses import boot, kd, progressive, rectified_flow, tract
from experiments.distill import common


def student_net(config, setup, schedule=None) -> common.Net:
  teacher = setup.teacher
  if teacher.module is not None and schedule is None:  # a trained teacher: its own architecture
    return common.Net(module=teacher.module, kind=teacher.kind, schedule=teacher.schedule,
                      example_shape=teacher.example_shape)
  return common.make_net(config, schedule or teacher.schedule, teacher.example_shape)


def copy_stage(config, setup, net: common.Net, *, name: str = "copy") -> common.Stage:
  """Fits `net` to the teacher's denoiser (only for teachers without weights)."""
  c = config.copy
  teacher = setup.teacher
  if c.num_steps <= 0 and not c.dir:
    raise ValueError(
        f"config.copy.num_steps={c.num_steps}: the teacher ({teacher.name}) has no weights a "
        "student can start from (an analytic or rescheduled teacher), so its network copy must "
        "be fitted: set --config.copy.num_steps > 0 (or --config.copy.dir to a fitted copy).")
  method = kd.denoiser_copy(net.denoise, teacher.apply, schedule=net.schedule,
                            weighting=c.weighting, time_sampler=c.time_sampler)
  optim = {**dict(config.optim), **({"learning_rate": c.learning_rate} if c.learning_rate else {})}
  return common.Stage(
      name=name, method=method, num_steps=c.num_steps,
      players=lambda r: {"student": common.make_player(
          optim, net.init(jax.random.key(config.seed)), num_steps=c.num_steps,
          ema={"eval": config.eval_ema})},
      frozen=lambda r: {"teacher": teacher.params},
      data=lambda r, d: setup.data(config.seed + 1),
      directory=c.dir or None)


def first_teacher(setup, net: common.Net):
  """The first round's (apply, params-of-results): the original teacher itself.

  Progressive distillation's and TRACT's first round distill the teacher, not the student's
  starting point: for an analytic teacher that is the exact denoiser (the network copy is only
  where the student starts, so its fitting error is not compounded into the targets); for a
  trained teacher it is its network, which is the same function as `net` at the teacher's weights.
  """
  teacher = setup.teacher
  if teacher.module is not None:
    return net.denoise, lambda r: teacher.params
  return teacher.apply, lambda r: teacher.params


def initial_params(setup, plan_stages, net):
  """The start of every student: the trained teacher's weights, or the copy stage's result."""
  if setup.teacher.module is not None:
    return lambda r: setup.teacher.params
  if not plan_stages or plan_stages[0].name != "copy":
    plan_stages.insert(0, copy_stage(setup.config, setup, net))
  return lambda r: r["copy"]["student"]


def ddim_student(net: common.Net, *, nfe: int, spacing: str, t_start: float, t_end: float,
                 schedule=None):
  schedule = schedule or net.schedule

  def run(params, x):
    return solvers.sample(functools.partial(net.denoise, params), x, schedule=schedule,
                          solver="ddim", nfe=nfe, spacing=spacing, t_start=t_start, t_end=t_end)

  return run


def build_pd(config, setup) -> common.Plan:
  """Rounds N = teacher_steps / 2, ..., 1; round N trains on the previous round's student."""
  c = config.pd
  net = student_net(config, setup)
  stages: list[common.Stage] = []
  init = initial_params(setup, stages, net)
  options = dict(schedule=net.schedule, spacing=c.spacing, weighting=c.weighting,
                 t_start=setup.t_start, t_end=setup.t_end)
  first_apply, first_params = first_teacher(setup, net)
  first_method = progressive.progressive_distillation(net.denoise, first_apply, **options)
  method = progressive.progressive_distillation(net.denoise, net.denoise, **options)
  students = []
  n, previous = c.teacher_steps // 2, None
  if c.teacher_steps < 2 or c.teacher_steps & (c.teacher_steps - 1):
    raise ValueError(f"pd.teacher_steps must be a power of two >= 2, got {c.teacher_steps}.")
  round_index = 0
  while n >= 1:
    name = f"round_{n}"
    source = init if previous is None else (lambda r, p=previous: r[p]["student"])
    teacher = first_params if previous is None else source
    stages.append(common.Stage(
        name=name, method=first_method if previous is None else method,
        num_steps=c.steps_per_round,
        players=lambda r, source=source: {"student": common.make_player(
            config.optim, source(r), num_steps=c.steps_per_round, ema={"eval": config.eval_ema})},
        frozen=lambda r, teacher=teacher, n=n: {"teacher": teacher(r), "num_steps": jnp.int32(n)},
        data=lambda r, d, k=round_index: setup.data(config.seed + 10 + k)))
    if n in c.eval_steps:
      students.append(common.Student(
          name="pd", nfe=n, params=lambda r, name=name: r[name]["student"],
          run=ddim_student(net, nfe=n, spacing=c.spacing, t_start=setup.t_start,
                           t_end=setup.t_end)))
    previous, n, round_index = name, n // 2, round_index + 1
  return common.Plan(stages=stages, students=students)


def teacher_pairs(config, setup, name: str, sample_fn, directory: str):
  """The pairs' pipeline: x_T from the teacher's marginal at t_start, x_0 = sample_fn(x_T)."""
  c = config.pairs
  base = jax.random.key(config.seed + 1000)
  noise = lambda i: np.asarray(setup.start_noise(jax.random.fold_in(base, i), c.chunk_size))  # noqa: E731
  source = pairs_lib.generate(lambda x: np.asarray(sample_fn(jnp.asarray(x))), noise,
                              directory=os.path.join(directory, name), num_pairs=c.num_pairs,
                              chunk_size=c.chunk_size, progress=config.progress)
  return common.Keys(pipeline.Pipeline(source, batch_size=config.batch_size, seed=config.seed,
                                       prefetch=0), ("x_T", "x"))


def _teacher_pair_sampler(config, setup):
  c = config.pairs
  if c.solver == "adaptive":
    return setup.teacher_sampler("adaptive", None, rtol=c.tol, atol=c.tol)
  return setup.teacher_sampler(c.solver, c.nfe)


def build_kd(config, setup) -> common.Plan:
  """One k-step student per k in kd.nfes, each from the teacher copy, on the teacher's pairs."""
  c = config.kd
  net = student_net(config, setup)
  stages: list[common.Stage] = []
  init = initial_params(setup, stages, net)
  workdir_pairs = lambda d: os.path.dirname(d)  # noqa: E731 (pairs live beside the stages)
  students = []
  for k in c.nfes:
    method = kd.knowledge_distillation(net.denoise, schedule=net.schedule, num_steps=k,
                                       spacing=c.spacing, distance=c.distance,
                                       t_start=setup.t_start, t_end=setup.t_end)
    name = f"kd_{k}"
    stages.append(common.Stage(
        name=name, method=method, num_steps=c.num_steps,
        players=lambda r: {"student": common.make_player(
            config.optim, init(r), num_steps=c.num_steps, ema={"eval": config.eval_ema})},
        data=lambda r, d: teacher_pairs(config, setup, "pairs", _teacher_pair_sampler(config, setup),
                                        workdir_pairs(d))))
    students.append(common.Student(
        name="kd", nfe=k, params=lambda r, name=name: r[name]["student"],
        run=ddim_student(net, nfe=k, spacing=c.spacing, t_start=setup.t_start,
                         t_end=setup.t_end)))
  return common.Plan(stages=stages, students=students)


def build_reflow(config, setup) -> common.Plan:
  """2-rectified flow on the teacher's pairs, sampled with Euler; then 1-step KD of the 2-RF."""
  c = config.reflow
  teacher = setup.teacher
  if not isinstance(teacher.schedule, schedules_lib.RectifiedFlow):
    raise ValueError("reflow needs a rectified-flow teacher (1-RF): set "
                     "config.teacher.schedule='rectified_flow'.")
  rf = schedules_lib.RectifiedFlow(t_min=c.s_min, t_max=1.0)  # the straight-line coordinate s
  net = student_net(config, setup)
  flow_net = common.Net(module=net.module, kind="flow", schedule=rf, example_shape=net.example_shape)
  stages: list[common.Stage] = []
  init = initial_params(setup, stages, net)
  if config.student.kind != "flow":
    raise ValueError("reflow students predict the velocity: set config.student.kind='flow'.")
  pair_dir = lambda d: os.path.dirname(d)  # noqa: E731
  euler = lambda k: ddim_student(flow_net, nfe=k, spacing="time_uniform",  # noqa: E731
                                 t_start=1.0, t_end=c.s_min)
  stages.append(common.Stage(
      name="reflow", method=rectified_flow.reflow(flow_net.apply, kind="flow", schedule=rf),
      num_steps=c.num_steps,
      players=lambda r: {"student": common.make_player(
          config.optim, init(r), num_steps=c.num_steps, ema={"eval": config.eval_ema})},
      data=lambda r, d: teacher_pairs(config, setup, "pairs", _teacher_pair_sampler(config, setup),
                                      pair_dir(d))))

  def two_rf_sampler(r):
    params = r["reflow"]["student"]
    return jax.jit(functools.partial(euler(c.pair_steps), params))

  kd_method = kd.knowledge_distillation(flow_net.denoise, schedule=rf, num_steps=1,
                                        spacing="time_uniform", distance=c.distance,
                                        t_start=1.0, t_end=c.s_min)
  stages.append(common.Stage(
      name="reflow_kd_1", method=kd_method, num_steps=c.kd_steps,
      players=lambda r: {"student": common.make_player(
          config.optim, r["reflow"]["student"], num_steps=c.kd_steps,
          ema={"eval": config.eval_ema})},
      data=lambda r, d: teacher_pairs(config, setup, "pairs_2rf", two_rf_sampler(r), pair_dir(d))))
  students = [common.Student(name="2-rectified flow", nfe=k,
                             params=lambda r: r["reflow"]["student"], run=euler(k))
              for k in c.nfes]
  students.append(common.Student(name="2-rectified flow + KD", nfe=1,
                                 params=lambda r: r["reflow_kd_1"]["student"], run=euler(1)))

  def straightness(results, x_start):
    """Liu et al.'s S of the exact 1-RF (the teacher) and of the learned 2-RF, on x_start."""
    one = rectified_flow.straightness(functools.partial(teacher.apply, teacher.params), x_start,
                                      schedule=teacher.schedule, num_steps=c.straightness_steps)
    two = rectified_flow.straightness(functools.partial(flow_net.denoise,
                                                        results["reflow"]["student"]),
                                      x_start, schedule=rf, num_steps=c.straightness_steps)
    return {"straightness_1rf": float(one), "straightness_2rf": float(two)}

  return common.Plan(stages=stages, students=students, notes={"extra": straightness})


def build_tract(config, setup) -> common.Plan:
  """Phases of TRACT: segments tract.segments (e.g. 8 then 1) over a teacher_steps-step teacher;
  phase p's student is phase p+1's teacher, and its segment count is the next T."""
  c = config.tract
  net = student_net(config, setup)
  stages: list[common.Stage] = []
  init = initial_params(setup, stages, net)
  options = dict(schedule=net.schedule, spacing=c.spacing, weighting=c.weighting,
                 t_start=setup.t_start, t_end=setup.t_end, self_teacher_decay=c.self_teacher_decay)
  first_apply, first_params = first_teacher(setup, net)
  first_method = tract.tract(net.denoise, first_apply, **options)
  method = tract.tract(net.denoise, net.denoise, **options)
  students, previous, teacher_steps = [], None, c.teacher_steps
  for phase, segments in enumerate(c.segments):
    if teacher_steps % segments:
      raise ValueError(f"tract.segments {tuple(c.segments)} must each divide the previous "
                       f"phase's steps (first: tract.teacher_steps={c.teacher_steps}).")
    name = f"phase_{segments}"
    source = init if previous is None else (lambda r, p=previous: r[p]["student"])
    teacher = first_params if previous is None else source
    stages.append(common.Stage(
        name=name, method=first_method if previous is None else method,
        num_steps=c.steps_per_phase,
        players=lambda r, source=source: {"student": common.make_player(
            config.optim, source(r), num_steps=c.steps_per_phase,
            ema={"eval": config.eval_ema, "self_teacher": c.self_teacher_decay})},
        frozen=lambda r, teacher=teacher, t=teacher_steps, s=segments: {
            "teacher": teacher(r), "teacher_steps": jnp.int32(t), "num_segments": jnp.int32(s)},
        data=lambda r, d, k=phase: setup.data(config.seed + 20 + k)))
    students.append(common.Student(
        name="tract", nfe=segments, params=lambda r, name=name: r[name]["student"],
        run=ddim_student(net, nfe=segments, spacing=c.spacing, t_start=setup.t_start,
                         t_end=setup.t_end)))
    previous, teacher_steps = name, segments
  return common.Plan(stages=stages, students=students)


class PriorNoise(common.SeededBatches):
  """Batches {"x_T": sigma(t_start) z}, z ~ N(0, I): BOOT's data-free input."""

  def __init__(self, scale: float, shape, batch_size: int, seed: int):
    super().__init__(batch_size, seed)
    self.scale, self.shape = scale, tuple(shape)

  def draw(self, rng):
    z = rng.standard_normal((self.batch_size, *self.shape))
    return {"x_T": (self.scale * z).astype(np.float32)}


def build_boot(config, setup) -> common.Plan:
  """BOOT from the teacher copy: the student g(x_T, t) bootstraps along the teacher's steps."""
  c = config.boot
  net = student_net(config, setup)
  stages: list[common.Stage] = []
  init = initial_params(setup, stages, net)
  # g predicts the signal like a data prediction, so the student network is used raw ('x0')
  g_net = common.Net(module=net.module, kind="x0", schedule=net.schedule,
                     example_shape=net.example_shape)
  method = boot.boot(g_net.denoise, setup.teacher.apply, schedule=net.schedule, spacing=c.spacing,
                     step=c.step, weighting=c.weighting, t_start=setup.t_start, t_end=setup.t_end)
  scale = float(net.schedule.sigma(jnp.float32(setup.t_start)))
  stages.append(common.Stage(
      name="boot", method=method, num_steps=c.num_steps,
      players=lambda r: {"student": common.make_player(
          config.optim, init(r), num_steps=c.num_steps, ema={"eval": config.eval_ema})},
      frozen=lambda r: {"teacher": setup.teacher.params, "num_steps": jnp.int32(c.grid_steps)},
      data=lambda r, d: PriorNoise(scale, setup.teacher.example_shape, config.batch_size,
                                   config.seed + 30)))

  def run(params, x):
    return boot.boot_state(g_net.denoise, params, x, setup.t_end, schedule=net.schedule,
                           t_start=setup.t_start)

  students = [common.Student(name="boot", nfe=1, params=lambda r: r["boot"]["student"], run=run)]
  return common.Plan(stages=stages, students=students)


RECIPES = {"pd": build_pd, "kd": build_kd, "reflow": build_reflow, "tract": build_tract,
           "boot": build_boot}

__all__ = ["RECIPES", "build_pd", "build_kd", "build_reflow", "build_tract", "build_boot",
           "copy_stage", "ddim_student", "PriorNoise"]
