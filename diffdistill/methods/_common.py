"""What several method modules share: the student network, the teacher copy, teacher pairs, the
DDIM sampler of a distilled denoiser, and a single-stage plan.

Students start from the teacher's weights; an analytic teacher has none, so its plan opens with a
`copy` stage that fits a network to the exact denoiser (`losses.kd.denoiser_copy`), and every
student starts from that copy.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import nets, solvers
from diffdistill.data import Keys, pairs as pairs_lib, pipeline
from diffdistill.losses import kd
from diffdistill.methods import plan as plan_lib


def make_net(config, schedule, example_shape, *, extra_cond: Sequence[str] = ()) -> nets.Net:
  """The student network of `config.student` (network name, kwargs, kind)."""
  kwargs = dict(config.student.kwargs)
  if extra_cond:
    kwargs["extra_cond"] = tuple(extra_cond)
  module = nets.get_network(config.student.network, **kwargs)
  return nets.Net(module=module, kind=config.student.kind, schedule=schedule,
                  example_shape=tuple(example_shape))


def student_net(config, setup, schedule=None) -> nets.Net:
  """A trained teacher's own architecture (students start from its weights), else config.student."""
  teacher = setup.teacher
  if teacher.module is not None and schedule is None:
    return nets.Net(module=teacher.module, kind=teacher.kind, schedule=teacher.schedule,
                    example_shape=teacher.example_shape,
                    apply_fn=getattr(teacher, "net_apply", None))
  return make_net(config, schedule or teacher.schedule, teacher.example_shape)


def extra_input_net(config, setup, net: nets.Net, extra_cond: Sequence[str]) -> nets.Net:
  """The student `net` with extra scalar inputs (MeanFlow's r, a shortcut model's d), whose
  projections start at zero so that it starts as `net` (`nets.init_from`). A student that is the
  teacher's own network (a workdir or imported checkpoint) keeps its architecture, with
  `extra_cond` added; an imported one reads its time-like extra inputs through the checkpoint's
  own time map (`interop._network`). Any other student is config.student's network."""
  teacher = setup.teacher
  if teacher.module is None or net.module is not teacher.module:
    return make_net(config, net.schedule, teacher.example_shape, extra_cond=extra_cond)
  if "extra_cond" not in getattr(type(teacher.module), "__dataclass_fields__", {}):
    raise ValueError(f"the teacher's network ({type(teacher.module).__name__}) takes no extra "
                     f"inputs, so a student with {', '.join(extra_cond)} cannot start from it.")
  module = teacher.module.clone(extra_cond=tuple(extra_cond))
  make = getattr(teacher, "make_net_apply", None)
  return nets.Net(module=module, kind=net.kind, schedule=net.schedule,
                  example_shape=net.example_shape, apply_fn=make(module) if make else None)


def copy_stage(config, setup, net: nets.Net, *, name: str = "copy") -> plan_lib.Stage:
  """Fits `net` to the teacher's denoiser (only for teachers without weights)."""
  c = config.copy
  teacher = setup.teacher
  if c.num_steps <= 0 and not _has_checkpoint(c.dir):
    raise ValueError(
        f"config.copy.num_steps={c.num_steps}: the teacher ({teacher.name}) has no weights a "
        "student can start from (an analytic or rescheduled teacher), so its network copy must "
        "be fitted: set --config.copy.num_steps > 0 (or --config.copy.dir to a fitted copy; "
        f"copy.dir={c.dir!r} holds none).")
  method = kd.denoiser_copy(net.denoise, teacher.apply, schedule=net.schedule,
                            weighting=c.weighting, time_sampler=c.time_sampler)
  optim = {**dict(config.optim), **({"learning_rate": c.learning_rate} if c.learning_rate else {})}
  return plan_lib.Stage(
      name=name, method=method, num_steps=c.num_steps,
      players=lambda r: {"student": plan_lib.make_player(
          optim, net.init(jax.random.key(config.seed)), num_steps=c.num_steps,
          ema={"eval": config.eval_ema})},
      frozen=lambda r: {"teacher": teacher.params},
      data=lambda r, d: setup.data(config.seed + 1),
      directory=c.dir or None, identity=copy_identity(config))


def copy_identity(config) -> dict:
  """What a shared copy (`copy.dir`) must agree on to be reused: the function it was fitted to
  (the teacher and its schedule) and the network it is (architecture and output kind). Its steps,
  learning rate and seed may differ (a longer run trains the shared copy on)."""
  t, s = config.teacher, config.student
  return {"teacher": {k: t.get(k) for k in ("kind", "name", "mixture_file", "path", "dataset",
                                            "schedule", "schedule_kwargs")},
          "student": {"network": s.network, "kwargs": s.kwargs, "kind": s.kind},
          "copy": {"weighting": config.copy.weighting, "time_sampler": config.copy.time_sampler}}


def _has_checkpoint(directory: str) -> bool:
  path = os.path.join(directory, "checkpoints") if directory else ""
  return bool(path) and os.path.isdir(path) and bool(os.listdir(path))


def first_teacher(setup, net: nets.Net):
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


def initial_params(setup, stages, net):
  """The start of every student: the trained teacher's weights, or the copy stage's result (the
  copy stage is put first into `stages` when it is not there yet)."""
  if setup.teacher.module is not None:
    return lambda r: setup.teacher.params
  if not stages or stages[0].name != "copy":
    stages.insert(0, copy_stage(setup.config, setup, net))
  return lambda r: r["copy"]["student"]


def single_stage(config, setup, name, method, num_steps, init, *, ema=None, params=None,
                 frozen=True) -> plan_lib.Stage:
  """One student trained from `init(results)` (or `params(results)`) on the testbed's data, with
  the eval EMA plus `ema`; frozen input "teacher" unless frozen=False."""
  return plan_lib.Stage(
      name=name, method=method, num_steps=num_steps,
      players=lambda r: {"student": plan_lib.make_player(
          config.optim, (params or init)(r), num_steps=num_steps,
          ema={"eval": config.eval_ema, **(ema or {})})},
      frozen=(lambda r: {"teacher": setup.teacher.params}) if frozen else (lambda r: None),
      data=lambda r, d: setup.data(config.seed + 20))


def ddim_sampler(net: nets.Net, *, t_start: float, t_end: float, spacing: str = "logsnr",
                 schedule=None):
  """A distilled denoiser's sampler: DDIM with exactly `nfe` steps on the `spacing` grid."""
  schedule = schedule or net.schedule

  def sample(params, x, *, nfe, rng=None, **cond):
    del rng  # deterministic
    return solvers.sample(lambda y, t: net.denoise(params, y, t, **cond), x, schedule=schedule,
                          solver="ddim", nfe=nfe, spacing=spacing, t_start=t_start, t_end=t_end)

  return sample


def teacher_pairs(config, setup, name: str, sample_fn, directory: str, *, seed: int | None = None,
                  batch_size: int | None = None):
  """The pairs' pipeline: x_T from the teacher's marginal at t_start, x_0 = sample_fn(x_T);
  batches of `batch_size` (default config.batch_size) in the order of `seed` (config.seed).
  A conditional teacher's (setup.conditional) pairs carry labels drawn uniformly per chunk:
  x_0 = sample_fn(x_T, labels), batches {"x_T", "x", "label"}."""
  c = config.pairs
  base = jax.random.key(config.seed + 1000)
  noise = lambda i: np.asarray(setup.start_noise(jax.random.fold_in(base, i), c.chunk_size))  # noqa: E731
  labelled = setup.conditional
  label_fn = None
  if labelled:
    label_base = jax.random.key(config.seed + 2000)
    label_fn = lambda i: np.asarray(setup.labels(jax.random.fold_in(label_base, i),  # noqa: E731
                                                 c.chunk_size))
  source = pairs_lib.generate(lambda x, *y: np.asarray(sample_fn(jnp.asarray(x), *y)), noise,
                              directory=os.path.join(directory, name), num_pairs=c.num_pairs,
                              chunk_size=c.chunk_size, progress=config.progress,
                              label_fn=label_fn,
                              num_classes=setup.teacher.num_classes if labelled else 0)
  return Keys(pipeline.Pipeline(source, batch_size=batch_size or config.batch_size,
                                seed=config.seed if seed is None else seed, prefetch=0),
              ("x_T", "x", "label") if labelled else ("x_T", "x"))


def teacher_pair_sampler(config, setup):
  """x_T -> x_0 of the teacher with config.pairs' solver (adaptive at pairs.tol by default); a
  conditional teacher's (x_T, labels) -> x_0."""
  c = config.pairs
  make = setup.labelled_teacher_sampler if setup.conditional else setup.teacher_sampler
  if c.solver == "adaptive":
    return make("adaptive", None, rtol=c.tol, atol=c.tol)
  return make(c.solver, c.nfe)


def pairs_data(config, setup, name: str = "pairs", sample_fn=None):
  """`data` of a stage trained on teacher pairs, kept beside the stages (WORKDIR/<name>)."""
  return lambda r, d: teacher_pairs(config, setup, name,
                                    sample_fn(r) if sample_fn else teacher_pair_sampler(config, setup),
                                    os.path.dirname(d))


def check_positive(section, name: str, keys: Sequence[str]) -> None:
  """ValueError naming `name.key` unless each of section's `keys` is an integer >= 1."""
  for key in keys:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}.{key} must be a positive integer, got {value!r}.")


def apply_overrides(config, overrides: dict) -> None:
  """Sets each dotted key of `overrides` on an ml_collections config."""
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = config
    for part in path:
      node = node[part]
    node[last] = value


__all__ = ["make_net", "student_net", "copy_stage", "copy_identity", "first_teacher",
           "initial_params", "single_stage", "ddim_sampler", "teacher_pairs",
           "teacher_pair_sampler", "pairs_data", "check_positive", "apply_overrides"]

