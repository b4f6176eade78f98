"""Guided progressive distillation (Meng et al. 2023) on a class-conditional analytic mixture.

The config section's classes: component k is in class k mod num_classes unless `classes` lists
each component's class; w in [w_min, w_max] (w = 1: the conditional teacher; Meng et al.'s w in
[0, 4] is ours - 1).

The teacher is exact: the testbed's mixture split into classes, each class a subset of its
components (`config.gpd.classes[k]` is the class of component k), with classifier-free guidance
D_w = D(x) + w (D(x | c) - D(x)) (`analytic.GuidedDenoiser`; w = 1 is the conditional teacher).
A guided teacher costs two denoiser calls per step; the distilled student one.

  stage 1 `guided`: a student D_s(x, t, c, w), conditioned on the label and on w ~ U[w_min, w_max],
    regresses the guided exact teacher (`losses.progressive.guided_copy_loss`);
  stage 2 `round_<N>`: progressive distillation of that student, N = teacher_steps / 2, ..., 1,
    with w drawn the same way and given to teacher and student alike (`pd_loss(guidance=...)`).

Evaluation (`evaluate`): for each w in `gpd.eval_w`, the same x_start and labels (uniform over
the classes) go through the student at each N and through the guided teacher's DDIM and
DPM-Solver++(2M) at the same number of steps (twice the calls). Each is scored by the per-sample
error to the exact guided probability-flow map of x_start (`analytic.flow_map` of the guided exact
denoiser at that w, float64), and each sample set's class accuracy (the fraction of samples whose
nearest component belongs to their label).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import analytic, metrics, solvers
from diffdistill.data import MixtureBatches
from diffdistill.losses import progressive
from diffdistill.methods import _common, pd, plan as plan_lib

CONFIG = {"gpd": dict(num_classes=4, classes=(), w_min=1.0, w_max=5.0, stage1_steps=3000,
                      teacher_steps=32, steps_per_round=1000, spacing="logsnr",
                      weighting="truncated_snr", time_sampler="logsnr_uniform",
                      eval_steps=(8, 4, 2, 1), eval_w=(1.0, 3.0))}
SETTINGS = {"student.kwargs.num_classes": 4}  # = gpd.num_classes (checked in build)
TESTBEDS = {"digits": "gpd needs an analytic (mixture) teacher: its classes are component subsets."}
TINY = {"gpd.stage1_steps": 20, "gpd.teacher_steps": 4, "gpd.steps_per_round": 20,
        "gpd.eval_steps": (2, 1), "gpd.eval_w": (3.0,)}
EXTRA_COND = ("w",)


@dataclasses.dataclass(frozen=True)
class Conditioned:
  """apply((params, cond), x, t) = inner(params, x, t, **cond): a conditional denoiser with its
  conditioning bound as data (hashable when `inner` is; for `analytic.flow_map`, `solvers`)."""
  inner: object

  def __call__(self, params_cond, x, t):
    params, cond = params_cond
    return self.inner(params, x, t, **cond)


def _classes(config, mix):
  """gpd.classes, or (empty) component k in class k mod gpd.num_classes."""
  if not config.gpd.classes:
    return np.arange(mix.num_components, dtype=np.int32) % int(config.gpd.num_classes)
  classes = np.asarray(config.gpd.classes, np.int32)
  if classes.shape != (mix.num_components,):
    raise ValueError(f"gpd.classes must give the class of each of the teacher's "
                     f"{mix.num_components} components, got {tuple(config.gpd.classes)}.")
  return classes


def sampler(net, *, t_start: float, t_end: float, spacing: str = "logsnr"):
  """DDIM with exactly nfe steps on the student D_s(x, t, label, w): cond label [B], w [B]."""
  return _common.ddim_sampler(net, t_start=t_start, t_end=t_end, spacing=spacing)


def build(config, setup) -> plan_lib.Plan:
  """Stage 1 (w-conditioned copy of the guided exact teacher), then PD rounds of that student."""
  c = config.gpd
  _common.check_positive(c, "gpd", ("stage1_steps", "steps_per_round"))
  teacher = setup.teacher
  if teacher.mixture is None:
    raise ValueError("gpd needs an analytic (mixture) teacher: its classes are component subsets.")
  classes = _classes(config, teacher.mixture)
  num_classes = int(classes.max()) + 1
  if config.student.kwargs.get("num_classes", 0) != num_classes:
    raise ValueError(f"gpd: config.student.kwargs.num_classes must be the number of classes, "
                     f"{num_classes} (from gpd.classes).")
  mixtures = analytic.class_mixtures(teacher.mixture, classes)
  guided = analytic.GuidedDenoiser(teacher.schedule)
  net = _common.make_net(config, teacher.schedule, teacher.example_shape, extra_cond=("w",))
  guidance = (float(c.w_min), float(c.w_max))
  data = lambda seed: MixtureBatches(teacher.mixture, config.batch_size, seed,  # noqa: E731
                                            classes=classes)

  stages = [plan_lib.Stage(
      name="guided", method=progressive.guided_distillation_stage1(
          net.denoise, guided, schedule=net.schedule, null_label=num_classes, guidance=guidance,
          weighting=c.weighting, time_sampler=c.time_sampler),
      num_steps=c.stage1_steps,
      players=lambda r: {"student": plan_lib.make_player(
          config.optim, net.init(jax.random.key(config.seed)), num_steps=c.stage1_steps,
          ema={"eval": config.eval_ema})},
      frozen=lambda r: {"teacher": mixtures},
      data=lambda r, d: data(config.seed + 1))]
  method = progressive.progressive_distillation(
      net.denoise, net.denoise, schedule=net.schedule, spacing=c.spacing, weighting=c.weighting,
      t_start=setup.t_start, t_end=setup.t_end, guidance=guidance)
  steps = pd.rounds(c.teacher_steps, "gpd")
  bad = sorted(set(c.eval_steps) - set(steps))
  if bad or not c.eval_steps:
    raise ValueError(f"gpd.eval_steps must be a non-empty subset of the rounds' step counts "
                     f"{steps} (gpd.teacher_steps={c.teacher_steps}), got {tuple(c.eval_steps)}.")
  sample = sampler(net, t_start=setup.t_start, t_end=setup.t_end, spacing=c.spacing)
  students, previous = [], "guided"
  for index, n in enumerate(steps):
    name = f"round_{n}"
    source = lambda r, p=previous: r[p]["student"]  # noqa: E731
    stages.append(plan_lib.Stage(
        name=name, method=method, num_steps=c.steps_per_round,
        players=lambda r, source=source: {"student": plan_lib.make_player(
            config.optim, source(r), num_steps=c.steps_per_round, ema={"eval": config.eval_ema})},
        frozen=lambda r, source=source, n=n: {"teacher": source(r), "num_steps": jnp.int32(n)},
        data=lambda r, d, k=index: data(config.seed + 10 + k)))
    if n in c.eval_steps:
      students.append(plan_lib.Student(name="guided PD", nfe=n,
                                     params=lambda r, name=name: r[name]["student"],
                                       sample=sample))
    previous = name
  students.append(plan_lib.Student(name="stage-1 student + DDIM", nfe=max(c.eval_steps),
                                 params=lambda r: r["guided"]["student"], sample=sample))
  return plan_lib.Plan(stages=stages, students=students, table=table,
                     evaluate=functools.partial(evaluate, net=net, mixtures=mixtures,
                                                guided=guided, classes=classes))


def _ddim(denoise, params, cond, x, *, schedule, nfe, spacing, t_start, t_end, solver="ddim"):
  return solvers.sample(lambda y, t: denoise(params, y, t, **cond), x, schedule=schedule,
                        solver=solver, nfe=nfe, spacing=spacing, t_start=t_start, t_end=t_end)


def class_accuracy(samples, labels, mix, classes) -> float:
  """The fraction of samples whose most responsible component belongs to their label's class."""
  resp = np.asarray(analytic.responsibilities(mix, jnp.asarray(samples, jnp.float32)))
  return float(np.mean(classes[np.argmax(resp, axis=1)] == labels))


def evaluate(plan, setup, results, workdir, *, net, mixtures, guided, classes,
             progress: bool = True) -> list[dict]:
  """Rows for every w in gpd.eval_w: students and the guided teacher at the same steps."""
  config = setup.config
  c = config.gpd
  mix, schedule = setup.teacher.mixture, setup.teacher.schedule
  n = config.eval.num_samples
  key = jax.random.key(config.eval.seed)
  x_start = np.asarray(setup.start_noise(key, n))
  labels = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (n,), 0, int(classes.max()) + 1))
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  kw = dict(schedule=schedule, spacing=c.spacing, t_start=setup.t_start, t_end=setup.t_end)
  rows = []
  for w in c.eval_w:
    w_arr = np.full((n,), w, np.float32)
    with jax.enable_x64(True):
      params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), mixtures)
      cond64 = {"label": jnp.asarray(labels), "w": jnp.asarray(w_arr, jnp.float64)}
      reference = np.asarray(analytic.flow_map(
          Conditioned(guided), (params64, cond64), jnp.asarray(x_start, jnp.float64),
          schedule=schedule, t_start=setup.t_start, t_end=setup.t_end,
          rtol=config.eval.ref_tol, atol=config.eval.ref_tol))
    cond = {"label": jnp.asarray(labels), "w": jnp.asarray(w_arr)}

    def add(method, steps, nfe, out):
      err = metrics.per_sample_error(jnp.asarray(out), jnp.asarray(reference, jnp.float32))
      rows.append({"method": f"{method} (w={w:g})", "nfe": nfe, "steps": steps,
                   "median": float(err["median"]), "rms": float(err["rms"]),
                   "class_accuracy": class_accuracy(out, labels, mix, classes),
                   "nan": bool(np.any(~np.isfinite(out)))})

    for student in plan.students:
      k = student.nfe
      out = np.asarray(jax.jit(functools.partial(_ddim, net.denoise, nfe=k, **kw))(
          student.params(results), cond, jnp.asarray(x_start)))
      add(student.name, k, k, out)
      np.savez(os.path.join(workdir, "samples",
                            f"{plan_lib.file_name(student.name)}_w{w:g}_nfe{k}.npz"),
               x_start=x_start, samples=out, label=labels, w=w, nfe=k)
    for k in sorted({s.nfe for s in plan.students}):
      for solver in ("ddim", "dpm_solver_pp_2m")[:1 if k < 2 else 2]:
        out = np.asarray(jax.jit(functools.partial(_ddim, guided, nfe=k, solver=solver, **kw))(
            mixtures, cond, jnp.asarray(x_start)))
        add(f"guided teacher {solver}", k, 2 * k, out)
    rows.append({"method": f"exact guided flow map (w={w:g})", "nfe": 0, "steps": 0, "median": 0.0,
                 "rms": 0.0, "class_accuracy": class_accuracy(reference, labels, mix, classes),
                 "nan": False})
  return rows


def table(rows) -> str:
  lines = ["| method | steps | NFE | coupling error median | RMS | class accuracy |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['steps']} | {r['nfe']} | {r['median']:.2e} | "
                 f"{r['rms']:.2e} | {r['class_accuracy']:.3f} |")
  return "\n".join(lines) + "\n"


__all__ = ["build", "sampler", "evaluate", "table", "Conditioned", "class_accuracy"]
