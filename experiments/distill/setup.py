"""The teacher and data of a distillation run, and the evaluation's start and end (`Setup`).

`make_setup(config)` loads the teacher of `config.teacher` (an analytic mixture, a mixture file,
a trained workdir or an imported checkpoint, rescheduled when the method needs another schedule)
and is the `setup` that every method module's `build(config, setup)` reads
(diffdistill/methods/__init__.py).

Data: exact samples of an analytic teacher's mixture; a trained teacher's dataset
(`config.teacher.dataset`); an imported teacher without a dataset trains on its own samples, the
x_0 of teacher pairs (`config.pairs`: x_T -> the teacher's solve) generated once into
WORKDIR/teacher_samples.

A class-conditional checkpoint with `config.teacher.conditional` keeps its label: the data carry
the dataset's labels (or, without a dataset, the teacher's own samples carry labels drawn
uniformly, stored with them), the students take `label` as
the teacher does, and the evaluation draws one label per sample (`labels`), fed to the teacher's
samplers, its exact map and every student alike.

A latent teacher (`config.teacher.vae`: the diffusers AutoencoderKL folder it was trained with,
e.g. DiT's SD-VAE) runs in latent space: dataset images are encoded (`Autoencoder.to_latent`, a
posterior draw per batch seeded by (seed, step), as DiT's training encodes), everything is
trained and coupled in latents, and `decode` turns samples into images for the figures and FID.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import analytic, solvers
from diffdistill import methods as methods_lib
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
  vae: Any = None  # a latent teacher's autoencoder (interop.Autoencoder), config.teacher.vae

  @property
  def latent(self) -> bool:
    return self.vae is not None

  @property
  def conditional(self) -> bool:
    """Whether the teacher and its students take a label (config.teacher.conditional)."""
    return bool(self.config.teacher.get("conditional")) and self.teacher.num_classes > 0

  def labels(self, rng, n: int):
    """n labels drawn uniformly from the teacher's K classes (None when not conditional)."""
    if not self.conditional:
      return None
    return jax.random.randint(rng, (n,), 0, self.teacher.num_classes, jnp.int32)

  def _conditioned(self):
    """(apply, params): the teacher as a function of ((params, label), x, t), so that samplers
    and the exact solve, which take no conditioning, carry the labels in their params."""
    apply = self.teacher.apply
    return (lambda pl, x, t: apply(pl[0], x, t, label=pl[1])), teachers_lib.device_params(
        self.teacher)

  def labelled_teacher_sampler(self, solver: str, nfe: int | None, **kw) -> Callable:
    """A conditional teacher's (x_start, labels) -> x_end, compiled once for every label set."""
    apply, params = self._conditioned()
    run = solvers.make_sampler(apply, schedule=self.teacher.schedule, solver=solver, nfe=nfe,
                               t_start=self.t_start, t_end=self.t_end, **kw)
    fn = jax.jit(lambda p, y, x: run((p, y), x))
    return lambda x, labels: fn(params, jnp.asarray(labels), x)

  def decode(self, z, batch_size: int = 64) -> np.ndarray:
    """Images in [-1, 1] (NHWC, float32) of latent samples z (clipped, as samplers' outputs
    are before they are saved as images); the samples themselves without a VAE."""
    if self.vae is None:
      return np.asarray(z)
    fn = self.__dict__.setdefault("_decode", jax.jit(self.vae.from_latent))
    out = [np.asarray(fn(self.vae.params, jnp.asarray(z[i:i + batch_size])))
           for i in range(0, len(z), batch_size)]
    return np.clip(np.concatenate(out), -1.0, 1.0)

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
    source = data_lib.Keys(ds, ("x", "label") if self.teacher.num_classes else ("x",))
    if self.vae is not None:
      source = data_lib.Mapped(source, "x", self._encoder(), seed)
    return source

  def _encoder(self) -> Callable:
    vae, shape = self.vae, tuple(self.teacher.example_shape)
    encode = jax.jit(vae.to_latent)
    f = int(vae.info.get("downsampling", 1))

    def fn(x, seed, step):
      z = np.asarray(encode(vae.params, jnp.asarray(x, jnp.float32),
                            jax.random.fold_in(jax.random.key(seed), step)))
      if tuple(z.shape[1:]) != shape:
        raise ValueError(
            f"config.teacher.dataset={self.config.teacher.dataset!r}: its images "
            f"{tuple(np.shape(x)[1:])} encode to latents {tuple(z.shape[1:])}, but the teacher "
            f"takes {shape}: images of {shape[0] * f}x{shape[1] * f} are needed (the VAE "
            f"downsamples by {f}).")
      return z
    return fn

  def _teacher_samples(self, seed: int, batch_size: int):
    from diffdistill.methods import _common  # noqa: PLC0415 (methods import this module's users)
    if self.workdir is None:
      raise ValueError("the teacher's own samples are kept in the run's folder: set setup.workdir.")
    source = _common.teacher_pairs(self.config, self, "teacher_samples",
                                   _common.teacher_pair_sampler(self.config, self), self.workdir,
                                   seed=seed, batch_size=batch_size)
    return data_lib.Keys(source, ("x", "label") if self.conditional else ("x",))

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

  def teacher_sampler(self, solver: str, nfe: int | None, labels=None, **kw) -> Callable:
    """jitted x_start -> x_end of the teacher with a training-free solver (a conditional
    teacher's at `labels` [N], one per row of x_start)."""
    if self.conditional:
      if labels is None:
        raise ValueError("a conditional teacher's sampler needs labels (setup.labels).")
      return functools.partial(self.labelled_teacher_sampler(solver, nfe, **kw),
                               labels=jnp.asarray(labels))
    return jax.jit(functools.partial(
        solvers.make_sampler(self.teacher.apply, schedule=self.teacher.schedule, solver=solver,
                             nfe=nfe, t_start=self.t_start, t_end=self.t_end, **kw),
        teachers_lib.device_params(self.teacher)))

  def exact_map(self, x_start: np.ndarray, labels=None) -> np.ndarray:
    """The exact flow map of x_start from t_start to t_end: an adaptive solve (Dopri8) at
    eval.ref_tol, in float64 for analytic teachers; a trained network computes in float32, where
    a float64 solve buys nothing below its tolerance and costs the U-Net many times over."""
    teacher = self.teacher
    dtype = jnp.float64 if teacher.mixture is not None else jnp.float32
    apply = teacher.apply
    if self.conditional:
      if labels is None:
        raise ValueError("a conditional teacher's exact map needs labels (setup.labels).")
      apply = self._conditioned()[0]
    with jax.enable_x64(dtype == jnp.float64):
      params = jax.tree.map(lambda a: jnp.asarray(a, dtype), teacher.params)
      out = []
      chunks = np.array_split(np.arange(len(x_start)), max(1, len(x_start) // 2048))
      for rows in chunks:
        p = (params, jnp.asarray(np.asarray(labels)[rows])) if self.conditional else params
        out.append(np.asarray(analytic.flow_map(
            apply, p, jnp.asarray(np.asarray(x_start)[rows], dtype), schedule=teacher.schedule,
            t_start=self.t_start, t_end=self.t_end, rtol=self.config.eval.ref_tol,
            atol=self.config.eval.ref_tol)))
    return np.concatenate(out)


def load_vae(path: str, teacher: teachers_lib.Teacher):
  """The autoencoder of a latent teacher, checked against the teacher's input shape."""
  from diffdistill import interop  # noqa: PLC0415 (flax when needed)
  if not path:
    return None
  loaded = interop.load(path)
  if not isinstance(loaded, interop.Autoencoder):
    raise ValueError(f"config.teacher.vae={path!r} is not an autoencoder (a diffusers "
                     f"AutoencoderKL folder, e.g. stabilityai/sd-vae-ft-ema); it loads as "
                     f"{type(loaded).__name__}.")
  channels, shape = loaded.info["latent_channels"], tuple(teacher.example_shape)
  if len(shape) != 3 or shape[-1] != channels:
    raise ValueError(f"config.teacher.vae={path!r} has {channels} latent channels; the teacher "
                     f"({teacher.name}) takes inputs of shape {shape}: not its latents.")
  return loaded


def make_setup(config) -> Setup:
  tc = config.teacher
  if tc.get("vae") and kind_of(tc) != "import":
    raise ValueError(f"config.teacher.vae is for an imported latent teacher (teacher.kind "
                     f"'import'); got teacher kind {kind_of(tc)!r}.")
  kind = kind_of(tc)
  conditional = bool(tc.get("conditional"))
  if conditional:
    check_conditional(config, kind)
  if kind in ("workdir", "import"):  # its own schedule, unless the config names another
    teacher = teachers_lib.load(kind=kind, path=tc.path, guidance=tc.guidance, **(
        dict(label=tc.label, conditional=conditional,
             guidance_interval=(tc.guidance_t_min, tc.guidance_t_max))
        if kind == "import" else {}))
    target = schedules_lib.get(tc.schedule, **dict(tc.schedule_kwargs)) if tc.schedule else None
    if kind == "import" and target is not None and target != teacher.schedule:
      extra = getattr(methods_lib.get(config.method), "EXTRA_COND", ())
      if extra:
        raise ValueError(
            f"{config.method}'s student takes {', '.join(extra)} as an input besides (x, t): it "
            f"starts from an imported network on the network's own schedule (a SiT for "
            f"rectified flow), not behind a change of schedule ({teacher.name} is on "
            f"{teacher.schedule.name}, the method needs {target.name}). Methods whose student "
            "is the teacher's own network run on any: pd, kd, cd, ect, scd, reflow, sid, dmd, ...")
    if target is not None:  # an imported network keeps its weights behind the change of schedule
      teacher = teachers_lib.reschedule(
          teacher, target, kind=config.student.kind if kind == "import" else None)
  else:
    schedule = schedules_lib.get(tc.schedule, **dict(tc.schedule_kwargs))
    teacher = teachers_lib.load(kind=kind, name=tc.name, path=tc.mixture_file or None,
                                schedule=schedule, guidance=tc.guidance)
  s = teacher.schedule
  return Setup(config=config, teacher=teacher, mesh=step_lib.make_mesh(), t_start=float(s.t_max),
               t_end=float(s.t_min), vae=load_vae(tc.get("vae", ""), teacher))


def check_conditional(config, kind: str) -> None:
  """config.teacher.conditional: an imported checkpoint and a method whose losses and samplers
  carry the label (its module's CONDITIONAL). The data: a labelled dataset, or the teacher's own
  samples at labels drawn uniformly (stored with them)."""
  if kind != "import":
    raise ValueError(f"config.teacher.conditional is for an imported class-conditional "
                     f"checkpoint (teacher kind 'import'); got {kind!r}.")
  if not getattr(methods_lib.get(config.method), "CONDITIONAL", False):
    able = [m for m in methods_lib.names() if getattr(methods_lib.get(m), "CONDITIONAL", False)]
    raise ValueError(f"{config.method} does not distil a class-conditional teacher over its "
                     f"labels (its losses do not read them); methods that do: {able}.")


def kind_of(tc) -> str:
  return "file" if tc.mixture_file else tc.kind



__all__ = ["Setup", "make_setup", "load_vae", "check_conditional"]
