"""The teacher and data of a distillation run, and the evaluation's start and end (`Setup`).

`make_setup(config)` loads the teacher of `config.teacher` (an analytic mixture, a mixture file,
a trained workdir or an imported checkpoint, rescheduled when the method needs another schedule)
and is the `setup` that every method module's `build(config, setup)` reads
(diffdistill/methods/__init__.py).

Data: exact samples of an analytic teacher's mixture; a trained teacher's dataset
(`config.teacher.dataset`); an imported teacher without a dataset trains on its own samples, the
x_0 of teacher pairs (`config.pairs`: x_T -> the teacher's solve) generated once into
WORKDIR/teacher_samples.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import analytic, solvers
from diffdistill import data as data_lib
from diffdistill import schedules as schedules_lib
from diffdistill.train import step as step_lib
from experiments import teachers as teachers_lib


@dataclasses.dataclass
class Setup:
  """The teacher, the data of the testbed, and the evaluation's start and end."""
  config: Any
  teacher: teachers_lib.Teacher
  mesh: jax.sharding.Mesh
  t_start: float
  t_end: float
  workdir: str | None = None  # the run's folder (set by the run: where teacher samples are kept)

  def data(self, seed: int, batch_size: int | None = None):
    """Data samples (exact samples for analytic teachers; the dataset for trained ones; the
    teacher's own samples for an imported teacher without a dataset)."""
    batch_size = batch_size or self.config.batch_size
    if self.teacher.mixture is not None:
      return data_lib.MixtureBatches(self.teacher.mixture, batch_size, seed)
    if not self.config.teacher.dataset:
      return self._teacher_samples(seed, batch_size)
    ds = data_lib.get_dataset(self.config.teacher.dataset, split="train", batch_size=batch_size,
                              seed=seed, prefetch=0)
    return data_lib.Keys(ds, ("x", "label") if self.teacher.num_classes else ("x",))

  def _teacher_samples(self, seed: int, batch_size: int):
    from diffdistill.methods import _common  # noqa: PLC0415 (methods import this module's users)
    if self.workdir is None:
      raise ValueError("the teacher's own samples are kept in the run's folder: set setup.workdir.")
    source = _common.teacher_pairs(self.config, self, "teacher_samples",
                                   _common.teacher_pair_sampler(self.config, self), self.workdir,
                                   seed=seed, batch_size=batch_size)
    return data_lib.Keys(source, ("x",))

  def start_noise(self, rng, n: int) -> jax.Array:
    """n samples of the teacher's marginal at t_start: alpha x0 + sigma eps (exact for analytic
    teachers; for trained ones x0 from the dataset's first examples)."""
    s = self.teacher.schedule
    k0, k1 = jax.random.split(rng)
    if self.teacher.mixture is not None:
      x0 = analytic.sample(self.teacher.mixture, k0, n, dtype=jnp.float32)
    else:
      x0 = jnp.zeros((n, *self.teacher.example_shape), jnp.float32)
    t = jnp.float32(self.t_start)
    return s.alpha(t) * x0 + s.sigma(t) * jax.random.normal(k1, (n, *self.teacher.example_shape))

  def teacher_sampler(self, solver: str, nfe: int | None, **kw) -> Callable:
    """jitted x_start -> x_end of the teacher with a training-free solver."""
    return jax.jit(functools.partial(
        solvers.make_sampler(self.teacher.apply, schedule=self.teacher.schedule, solver=solver,
                             nfe=nfe, t_start=self.t_start, t_end=self.t_end, **kw),
        teachers_lib.device_params(self.teacher)))

  def exact_map(self, x_start: np.ndarray) -> np.ndarray:
    """The exact flow map of x_start from t_start to t_end: an adaptive solve (Dopri8) at
    eval.ref_tol, in float64 for analytic teachers; a trained network computes in float32, where
    a float64 solve buys nothing below its tolerance and costs the U-Net many times over."""
    teacher = self.teacher
    dtype = jnp.float64 if teacher.mixture is not None else jnp.float32
    with jax.enable_x64(dtype == jnp.float64):
      params = jax.tree.map(lambda a: jnp.asarray(a, dtype), teacher.params)
      out = []
      for chunk in np.array_split(np.asarray(x_start), max(1, len(x_start) // 2048)):
        out.append(np.asarray(analytic.flow_map(
            teacher.apply, params, jnp.asarray(chunk, dtype), schedule=teacher.schedule,
            t_start=self.t_start, t_end=self.t_end, rtol=self.config.eval.ref_tol,
            atol=self.config.eval.ref_tol)))
    return np.concatenate(out)


def make_setup(config) -> Setup:
  tc = config.teacher
  kind = "file" if tc.mixture_file else tc.kind
  if kind in ("workdir", "import"):  # its own schedule, unless the config names another
    teacher = teachers_lib.load(kind=kind, path=tc.path,
                                **(dict(label=tc.label) if kind == "import" else {}))
    if tc.schedule and kind == "import" and schedules_lib.get(
        tc.schedule, **dict(tc.schedule_kwargs)) != teacher.schedule:
      raise ValueError(
          f"{config.method} trains on the {tc.schedule} schedule; an imported teacher is distilled "
          f"on its own ({teacher.schedule.name}): a student on another schedule would be a fresh "
          "network of another architecture, which is not wired yet. Methods that start from the "
          "teacher's weights on its schedule, e.g. pd, kd, cd, ect, sid, dmd.")
    if tc.schedule:
      teacher = teachers_lib.reschedule(
          teacher, schedules_lib.get(tc.schedule, **dict(tc.schedule_kwargs)))
  else:
    schedule = schedules_lib.get(tc.schedule, **dict(tc.schedule_kwargs))
    teacher = teachers_lib.load(kind=kind, name=tc.name, path=tc.mixture_file or None,
                                schedule=schedule)
  s = teacher.schedule
  return Setup(config=config, teacher=teacher, mesh=step_lib.make_mesh(), t_start=float(s.t_max),
               t_end=float(s.t_min))



__all__ = ["Setup", "make_setup"]
