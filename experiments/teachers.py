"""One loader for every teacher: an analytic mixture by name, a mixture file, or a trained network.

    teacher = teachers.load(kind="analytic", name="mixture64", schedule=schedules.VPLinear())
    teacher = teachers.load(kind="file", path="mix.npz", schedule=...)
    teacher = teachers.load(kind="workdir", path="runs/teacher_digits")
    teacher = teachers.load(kind="import", path="DiT-XL-2-256x256.pt")   # interop.load's formats
    teacher.apply(teacher.params, x, t)          # the denoiser: x0_hat
    teachers.reschedule(teacher, schedules.RectifiedFlow())   # the same teacher on another schedule

A teacher is the `(apply, params, schedule)` triple of DESIGN.md plus what the experiments need
to know about it: the exact data law where there is one (`mixture`: analytic and file teachers),
the example shape, and for a trained network its raw module and output kind (so that a student
can start from its weights, `nets.init_from`).

A mixture file is an `.npz` with `weights` [K], `means` [K, d] and `covs` [K, d, d] (any K, d;
`save_mixture` writes one). A train_teacher workdir is read through its `config.json` and its
newest checkpoint (the EMA params named by the config's `eval_ema`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffdistill import analytic, parametrization
from diffdistill import schedules as schedules_lib

KINDS = ("analytic", "file", "workdir", "import")


@dataclasses.dataclass(frozen=True)
class Teacher:
  """apply(params, x, t, **cond) -> x0_hat, its params and schedule, and what is known about it."""
  name: str
  apply: Callable
  params: Any
  schedule: schedules_lib.Schedule
  example_shape: tuple[int, ...]
  mixture: analytic.GaussianMixture | None = None  # the exact data law, when known
  module: Any = None  # a trained teacher's raw network (nets), else None
  kind: str | None = None  # that network's output parametrization
  num_classes: int = 0
  # an imported network's function in the library's conventions (interop.Teacher.net_apply),
  # where it is not nets.make_apply(module), and the same for another module of its architecture
  # (a student's with extra inputs: interop.Teacher.make_net_apply)
  net_apply: Callable | None = None
  make_net_apply: Callable | None = None


def save_mixture(path: str, mix: analytic.GaussianMixture) -> None:
  """Writes `mix` as a mixture file (weights [K], means [K, d], covs [K, d, d]); the covariances
  are rebuilt from the eigen-factors in float64 and symmetrized, so that the file loads back
  (`mix.covs` in float32 is symmetric only to ~1e-8, beyond the loader's check)."""
  if mix.eigvecs is None:
    covs = np.asarray(mix.covs, np.float64)
  else:
    u, lam = np.asarray(mix.eigvecs, np.float64), np.asarray(mix.eigvals, np.float64)
    covs = np.einsum("kij,kj,klj->kil", u, lam, u)
    covs = 0.5 * (covs + np.swapaxes(covs, 1, 2))
  np.savez(path, weights=np.asarray(mix.weights, np.float64),
           means=np.asarray(mix.means, np.float64), covs=covs)


def load_mixture(path: str) -> analytic.GaussianMixture:
  """Reads a mixture file; ValueError naming what is missing or misshapen, or that it is not an
  .npz."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No mixture file at {path!r}.")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"PK\x03\x04":  # an .npz is a zip archive; np.load would try a pickle
    raise ValueError(f"Mixture file {path!r} is not an .npz archive (it starts with {magic!r}); "
                     "write one with experiments.teachers.save_mixture(path, mix) or "
                     "np.savez(path, weights=[K], means=[K, d], covs=[K, d, d]).")
  with np.load(path) as f:
    missing = {"weights", "means", "covs"} - set(f.files)
    if missing:
      raise ValueError(f"Mixture file {path!r} lacks {sorted(missing)}; it needs weights [K], "
                       f"means [K, d] and covs [K, d, d] (it has {sorted(f.files)}).")
    return analytic.GaussianMixture(f["weights"], f["means"], f["covs"])


def load(*, kind: str, name: str | None = None, path: str | None = None,
         schedule: schedules_lib.Schedule | None = None, label: int | None = None,
         conditional: bool = False, guidance: float = 1.0,
         guidance_interval: tuple[float, float] = (0.0, math.inf)) -> Teacher:
  """The teacher of `kind` (module docstring).

  Args:
    kind: 'analytic' (name: an analytic.MIXTURES name), 'file' (path: a mixture .npz),
      'workdir' (path: a train_teacher run folder) or 'import' (path: a public checkpoint,
      `diffdistill.interop.load`: a DiT / SiT .pt, a diffusers DiT or UNet2DModel folder, an EDM
      .pkl).
    schedule: the analytic and file teachers' forward process (default VPLinear()); a trained
      teacher has its own (from its config).
    label: an imported class-conditional network is distilled at one fixed label: a class in
      [0, K) or the null class K (-1 or None: the null class, i.e. the unconditional model of
      classifier-free guidance).
    conditional: an imported class-conditional network keeps its label input instead
      (`apply(params, x, t, label=y)`, y in [0, K], K the null class; `num_classes` = K).
    guidance: classifier-free guidance of an imported class-conditional teacher's denoiser,
      D_w = D(x | null) + w (D(x | label) - D(x | null)) (`parametrization.guided`; 1: none),
      applied at the times t within `guidance_interval` (lo, hi) and 1 elsewhere (a guidance
      interval, Kynkaanniemi et al. 2024). Only the teacher's denoiser is guided: a student
      still starts from the checkpoint's own (unguided) network and learns the guided teacher.
  """
  if kind not in KINDS:
    raise ValueError(f"teacher kind must be one of {KINDS}, got {kind!r}.")
  if kind in ("workdir", "import"):
    if schedule is not None:
      raise ValueError(f"a {'trained' if kind == 'workdir' else 'imported'} teacher brings its "
                       "own schedule; do not pass one.")
    if conditional and kind != "import":
      raise ValueError("conditional=True is for an imported class-conditional checkpoint.")
    if kind == "workdir":
      if guidance != 1.0:
        raise ValueError("guidance is for an imported class-conditional checkpoint (teacher "
                         f"kind 'import'); got kind 'workdir' with guidance={guidance}.")
      return _load_workdir(path)
    return _load_import(path, label, conditional, guidance, tuple(guidance_interval))
  if guidance != 1.0:
    raise ValueError(f"guidance is for an imported class-conditional checkpoint (teacher kind "
                     f"'import'); got kind {kind!r} with guidance={guidance}.")
  schedule = schedule or schedules_lib.VPLinear()
  if kind == "analytic":
    mix, label = analytic.get_mixture(name), name
  else:
    if not path:
      raise ValueError("teacher kind 'file' needs path= a mixture .npz.")
    mix, label = load_mixture(path), os.path.basename(path)
  return Teacher(name=label, apply=analytic.denoiser(schedule), params=mix, schedule=schedule,
                 example_shape=(mix.dim,), mixture=mix)


def _load_workdir(path: str | None) -> Teacher:
  from experiments.train_teacher import teacher as teacher_lib  # noqa: PLC0415 (flax when needed)
  if not path or not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(
        f"No trained teacher at {path!r} (its config.json is missing). Train one with "
        f"`python -m experiments.train_teacher.main --config=experiments/train_teacher/config.py:"
        f"digits_cpu --workdir={path or 'runs/teacher_digits'}` (~15 min on 2 CPU cores).")
  with open(os.path.join(path, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  setup, step, params = teacher_lib.load_teacher(config, path)
  setup.data.close()
  return Teacher(name=f"{config.dataset.name}@{step}", apply=setup.denoise, params=params,
                 schedule=setup.schedule, example_shape=setup.example_shape,
                 mixture=None, module=setup.module, kind=config.loss.kind,
                 num_classes=int(getattr(setup.module, "num_classes", 0)))


def _with_label(fn: Callable, label: int) -> Callable:
  """fn(params, x, t, **cond) with label = `label` for every example."""
  def conditioned(params, x, t, **cond):
    return fn(params, x, t, label=jnp.full((x.shape[0],), label, jnp.int32), **cond)
  return conditioned


def _guided(apply: Callable, w: float, interval: tuple[float, float], null: int) -> Callable:
  """apply guided at scale w where t lies in `interval`, unguided (w = 1) elsewhere."""
  lo, hi = interval

  def guided(params, x, t, **cond):
    tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    scale = jnp.where((tb >= lo) & (tb <= hi), w, 1.0)
    return parametrization.guided(apply, scale, null_cond={"label": null})(params, x, t, **cond)
  return guided


def _load_import(path: str | None, label: int | None = None, conditional: bool = False,
                 guidance: float = 1.0,
                 guidance_interval: tuple[float, float] = (0.0, math.inf)) -> Teacher:
  from diffdistill import interop  # noqa: PLC0415 (flax when needed)
  if not path:
    raise ValueError("teacher kind 'import' needs path= a checkpoint file or folder "
                     "(diffdistill.interop.load; docs/teachers.md).")
  loaded = interop.load(path)
  if not isinstance(loaded, interop.Teacher):
    raise ValueError(f"{path} is an autoencoder (a latent teacher's VAE), not a teacher; pass the "
                     "diffusion network's checkpoint.")
  name = f"{loaded.family}:{os.path.basename(os.path.normpath(path))}"
  apply, net_apply, make = loaded.apply, loaded.net_apply, loaded.make_net_apply
  if guidance != 1.0:
    lo, hi = guidance_interval
    if not loaded.num_classes:
      raise ValueError(f"guidance={guidance} needs a class-conditional teacher; {name} has no "
                       "label input.")
    if not conditional and (label is None or label < 0 or label == loaded.num_classes):
      raise ValueError(f"guidance={guidance} guides a class against the null class: give "
                       f"conditional=True or a label in [0, {loaded.num_classes}), not the null "
                       "class.")
    if guidance < 0 or not lo <= hi:
      raise ValueError(f"guidance must be >= 0 and guidance_interval (lo, hi) with lo <= hi; "
                       f"got {guidance} and {guidance_interval}.")
    apply = _guided(apply, float(guidance), (float(lo), float(hi)), loaded.num_classes)
    name += f" (guided, w = {guidance:g}" + (f" for t in [{lo:g}, {hi:g}])"
                                            if (lo, hi) != (0.0, math.inf) else ")")
  if conditional:  # every label: the teacher and its students take `label`
    if not loaded.num_classes:
      raise ValueError(f"{name} is not class-conditional (no label input): drop "
                       "conditional / --config.teacher.conditional.")
    return Teacher(name=f"{name} (all {loaded.num_classes} classes)", apply=apply,
                   params=loaded.params, schedule=loaded.schedule,
                   example_shape=loaded.example_shape, module=loaded.network, kind=loaded.kind,
                   num_classes=loaded.num_classes, net_apply=net_apply, make_net_apply=make)
  if loaded.num_classes:  # one class (or the null class): the teacher is a function of (x, t)
    k = loaded.num_classes
    label = k if label is None or label < 0 else label
    if label > k:
      raise ValueError(f"label must be in [0, {k}] for {name} ({k} classes; {k} = the null "
                       f"class, -1 its alias), got {label}.")
    apply, net_apply = _with_label(apply, label), _with_label(net_apply, label)
    make = (lambda m, _make=make, _label=label: _with_label(_make(m), _label))  # noqa: E731
    name += f" (class {label})" if label < k else " (null class)"
  return Teacher(name=name, apply=apply, params=loaded.params, schedule=loaded.schedule,
                 example_shape=loaded.example_shape, module=loaded.network, kind=loaded.kind,
                 num_classes=0, net_apply=net_apply, make_net_apply=make)


def reschedule(teacher: Teacher, schedule: schedules_lib.Schedule, *,
               kind: str | None = None) -> Teacher:
  """The same teacher on another forward process (`parametrization.rescheduled`).

  Without `kind`, a trained teacher's weights no longer define a student on the new schedule:
  the result has no `module` or `kind`, so experiments fit a network copy of it (like an
  analytic teacher) instead of starting a student from its weights. With `kind` (the student's
  output parametrization) and an imported network (`net_apply`), the weights stay: `net_apply`
  becomes the network read as `kind` on the new schedule through the exact change of schedule
  (`parametrization.rescheduled_net`), so a student starts from the checkpoint as the teacher
  itself. The exact data law, where there is one, stays.
  """
  if not isinstance(schedule, schedules_lib.Schedule):
    raise ValueError(f"schedule must be a schedules.Schedule, got {schedule!r}.")
  if schedule == teacher.schedule:
    return teacher
  apply = parametrization.rescheduled(teacher.apply, source=teacher.schedule, target=schedule)
  name = f"{teacher.name} on {schedule.name}"
  if kind is not None and teacher.net_apply is not None:
    net_apply = parametrization.rescheduled_net(teacher.net_apply, kind=teacher.kind,
                                                source=teacher.schedule, target=schedule,
                                                target_kind=kind)
    return dataclasses.replace(teacher, name=name, apply=apply, schedule=schedule, kind=kind,
                               net_apply=net_apply, make_net_apply=None)
  return dataclasses.replace(teacher, name=name, apply=apply, schedule=schedule, module=None,
                             kind=None, net_apply=None, make_net_apply=None)


def device_params(teacher: Teacher):
  """The teacher's params as device arrays (float32)."""
  return jax.tree.map(lambda a: jax.numpy.asarray(a), teacher.params)


__all__ = ["Teacher", "KINDS", "load", "reschedule", "save_mixture", "load_mixture",
           "device_params"]
