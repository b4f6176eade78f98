"""The machinery every distillation recipe shares: stages of training, their data, and evaluation.

A recipe (`recipes/`) turns a config into a `Plan`: an ordered list of `Stage`s and the `Student`s
to evaluate. A stage trains players with one `train.method.Method` for a number of steps; its
players start from the results of earlier stages (a student starts from the teacher copy, a
progressive-distillation round from the previous round), and its frozen inputs (teacher params,
round constants) are computed from them too. Stages run in order, each in `WORKDIR/<stage name>/`
with its own checkpoints: a killed run restarted with the same command skips the finished stages
(restored from their last checkpoint) and resumes the interrupted one where it stopped.

Evaluation (`evaluate`): every student maps the same N exact samples x_start of the teacher's
marginal at t_start to t_end with its NFE; it is scored against the exact probability-flow map of
x_start (analytic teachers: `analytic.flow_map` of the exact denoiser, float64; trained teachers:
the teacher's own adaptive solve, float32) and, as a distribution, against exact samples (sliced W2, MMD^2,
with the exact-vs-exact floor), next to the teacher's DDIM and its best training-free solver at
the same NFE. Each student's samples go to `samples/<student>_nfe<k>.npz`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import statistics
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import analytic, metrics, nets, parametrization
from diffdistill import schedules as schedules_lib
from diffdistill import solvers
from diffdistill import data as data_lib
from diffdistill.train import checkpoint as ckpt_lib
from diffdistill.train import loop, optim, state as state_lib, step as step_lib
from diffdistill.train.method import Method
from experiments import teachers as teachers_lib
from experiments.train_teacher import sampling

Results = dict[str, Any]  # stage name -> {player name: params (the eval EMA where there is one)}


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Net:
  """A student network: raw module, its denoiser on `schedule` in parametrization `kind`."""
  module: Any
  kind: str
  schedule: schedules_lib.Schedule
  example_shape: tuple[int, ...]

  @functools.cached_property
  def apply(self) -> Callable:  # the raw network
    return nets.make_apply(self.module)

  @functools.cached_property
  def denoise(self) -> Callable:  # apply(params, x, t, **cond) -> x0_hat, built once (hashable)
    return parametrization.as_denoiser(self.apply, kind=self.kind, schedule=self.schedule)

  def init(self, rng) -> Any:
    return nets.init_params(self.module, rng, jnp.zeros((1, *self.example_shape), jnp.float32))


def make_net(config, schedule, example_shape, *, extra_cond: Sequence[str] = ()) -> Net:
  """The student network of `config.student` (network name, kwargs, kind)."""
  kwargs = dict(config.student.kwargs)
  if extra_cond:
    kwargs["extra_cond"] = tuple(extra_cond)
  module = nets.get_network(config.student.network, **kwargs)
  parametrization.check_kind(config.student.kind)
  return Net(module=module, kind=config.student.kind, schedule=schedule,
             example_shape=tuple(example_shape))


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


class SeededBatches(Iterator[dict]):
  """Batches drawn from PCG64([seed, s]) at step s: resumable in O(1) (get_state / set_state)."""

  def __init__(self, batch_size: int, seed: int):
    self.batch_size, self.seed, self.step = batch_size, seed, 0

  def draw(self, rng: np.random.Generator) -> dict:
    raise NotImplementedError

  def __next__(self):
    batch = self.draw(np.random.default_rng([self.seed, self.step]))
    self.step += 1
    return batch

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = int(state["step"])

  def close(self):
    pass


class MixtureBatches(SeededBatches):
  """Exact samples {"x"} of a mixture (and {"label"} with `classes`).

  x = mu_k + U_k (sqrt(s_k) * z), k ~ Categorical(pi): the law of `analytic.sample`, computed one
  component at a time (a [n_k, d] x [d, d] product each) rather than gathering a d x d rotation
  per example, which made sampling the slowest part of a 64-D training step.
  """

  def __init__(self, mix: analytic.GaussianMixture, batch_size: int, seed: int, *,
               classes: np.ndarray | None = None):
    super().__init__(batch_size, seed)
    # classes [K]: the class of each component; batches then carry "label", their component's
    self._classes = None if classes is None else np.asarray(classes, np.int32)
    self._weights = np.asarray(mix.weights, np.float64)
    self._weights = self._weights / self._weights.sum()
    self._means = np.asarray(mix.means, np.float64)
    self._scales = np.sqrt(np.asarray(mix.eigvals, np.float64))
    self._rot = None if mix.eigvecs is None else np.asarray(mix.eigvecs, np.float64)

  def draw(self, rng):
    k = rng.choice(self._weights.size, size=self.batch_size, p=self._weights)
    z = rng.standard_normal((self.batch_size, self._means.shape[1])) * self._scales[k]
    if self._rot is not None:
      for c in np.unique(k):
        rows = k == c
        z[rows] = z[rows] @ self._rot[c].T
    batch = {"x": (self._means[k] + z).astype(np.float32)}
    if self._classes is not None:
      batch["label"] = self._classes[k]
    return batch


class Keys(Iterator[dict]):
  """Batches that select only `keys` of another iterator (the loss's inputs; indices stay home)."""

  def __init__(self, data, keys: Sequence[str]):
    self._data, self._keys = data, tuple(keys)

  def __next__(self):
    batch = next(self._data)
    return {k: batch[k] for k in self._keys}

  def get_state(self):
    return self._data.get_state()

  def set_state(self, state):
    self._data.set_state(state)

  def close(self):
    getattr(self._data, "close", lambda: None)()


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
  """One training stage.

  players: results of the earlier stages -> {name: Player} (fresh players, optimizer included).
  frozen: results -> the frozen inputs of the method (None: none).
  data: (results, stage_dir) -> a resumable iterator of numpy batches (get_state / set_state).
  """
  name: str
  method: Method
  num_steps: int
  players: Callable[[Results], dict[str, state_lib.Player]]
  data: Callable[[Results, str], Any]
  frozen: Callable[[Results], Any] = lambda results: None
  eval_ema: str | None = "eval"  # the EMA copy reported as the stage's result (None: params)
  directory: str | None = None  # where it runs (default WORKDIR/<name>); shared copies set it


@dataclasses.dataclass(frozen=True)
class Student:
  """A distilled sampler: run(params, x_start) -> samples at t_end with exactly `nfe` calls."""
  name: str
  nfe: int
  params: Callable[[Results], Any]
  run: Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass
class Plan:
  stages: list[Stage]
  students: list[Student]
  notes: dict = dataclasses.field(default_factory=dict)  # extra numbers for results.json
  # a recipe that scores differently (e.g. conditional students): evaluate(plan, setup, results,
  # workdir, progress=) -> rows, and its own markdown table(rows); None: `evaluate`, `table`
  evaluate: Callable | None = None
  table: Callable | None = None


@dataclasses.dataclass
class Setup:
  """The teacher, the data of the testbed, and the evaluation's start and end."""
  config: Any
  teacher: teachers_lib.Teacher
  mesh: jax.sharding.Mesh
  t_start: float
  t_end: float

  def data(self, seed: int, batch_size: int | None = None):
    """Data samples (exact samples for analytic teachers; the dataset for trained ones)."""
    batch_size = batch_size or self.config.batch_size
    if self.teacher.mixture is not None:
      return MixtureBatches(self.teacher.mixture, batch_size, seed)
    ds = data_lib.get_dataset(self.config.teacher.dataset, split="train", batch_size=batch_size,
                              seed=seed, prefetch=0)
    return Keys(ds, ("x", "label") if self.teacher.num_classes else ("x",))

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
  if kind == "workdir":  # its own schedule, unless the config names another (then rescheduled)
    teacher = teachers_lib.load(kind="workdir", path=tc.path)
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


@functools.lru_cache(maxsize=None)
def _optimizer(config_json: str, num_steps: int):
  return optim.make_optimizer(json.loads(config_json), num_steps=num_steps)


def make_player(config_optim, params, *, num_steps: int, ema: Mapping[str, Any] | None = None):
  """A fresh player. Equal optimizer settings give the same optax object: the optimizer is part
  of the state's static structure, so a new object would retrace the step at every round."""
  tx = _optimizer(json.dumps(dict(config_optim), sort_keys=True), int(num_steps))
  return state_lib.Player.create(params=params, tx=tx, ema=ema)


# ----------------------------------------------------------------------------------------------
# Running the stages
# ----------------------------------------------------------------------------------------------


def _result(state: state_lib.TrainState, eval_ema: str | None) -> dict[str, Any]:
  out = {}
  for name, p in state.players.items():
    params = p.ema[eval_ema] if eval_ema and eval_ema in p.ema else p.params
    out[name] = jax.device_get(params)
  return out


def run_stages(plan: Plan, setup: Setup, workdir: str, *, progress: bool = True) -> tuple[Results, dict]:
  """Trains every stage in order (resuming finished and interrupted ones); returns the results
  and per-stage stats {name: {steps, seconds, final metrics}}."""
  config = setup.config
  results: Results = {}
  stats = {}
  steps = {}  # one jitted step per method: the rounds of a method share its compilation
  for index, stage in enumerate(plan.stages):
    stage_dir = stage.directory or os.path.join(workdir, stage.name)
    players = stage.players(results)
    frozen = stage.frozen(results)
    state = state_lib.TrainState.create(players=players,
                                        rng=jax.random.fold_in(jax.random.key(config.seed), index))
    stage.method.check(state.players, frozen)
    rep = step_lib.replicated(setup.mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                            jax.eval_shape(lambda: state))
    checkpointer = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"), max_to_keep=1)
    data = stage.data(results, stage_dir)
    try:
      restored = checkpointer.restore_latest(abstract)
      if restored is not None:
        state, data_state = restored
        data.set_state(data_state)
      t0 = time.perf_counter()
      start = int(state.step)
      if start < stage.num_steps:
        if id(stage.method) not in steps:
          steps[id(stage.method)] = step_lib.make_step(stage.method, mesh=setup.mesh)
        train_step = steps[id(stage.method)]
        state = loop.run(state=state, train_step=train_step, data=data, mesh=setup.mesh,
                         workdir=stage_dir, num_steps=stage.num_steps, checkpointer=checkpointer,
                         log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                         progress=progress, tensorboard=False, frozen=frozen)
      seconds = time.perf_counter() - t0
    finally:
      checkpointer.close()
      getattr(data, "close", lambda: None)()
    results[stage.name] = _result(state, stage.eval_ema)
    last = _last_metrics(stage_dir)
    stats[stage.name] = {"steps": stage.num_steps, "trained_now": stage.num_steps - start,
                         "seconds": seconds, "final": last}
  return results, stats


def _last_metrics(stage_dir: str) -> dict:
  path = os.path.join(stage_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = f.read().strip().splitlines()
  return json.loads(lines[-1]) if lines else {}


def trunk_features(net: Net):
  """(features(params, x_t, t) -> [B, F], F): a network's trunk features, which a GAN head reads
  (DMD2's on the fake score, CTM's on a frozen network copy). A ScoreMLP gives its last residual
  block's output; a U-Net the output of its bottleneck (the second middle block at the lowest
  resolution), averaged over space."""
  module = net.module
  if isinstance(module, nets.UNet):
    levels = len(module.channel_mult)
    # blocks are created in order: per level (a down block after level 0) + num_blocks, then
    # the two middle blocks
    last = f"UNetBlock_{levels * module.num_blocks + (levels - 1) + 1}"
    dim = module.model_channels * module.channel_mult[-1]
  elif isinstance(module, nets.ScoreMLP):
    last = f"MLPBlock_{module.num_blocks - 1}"
    dim = module.features
  else:
    raise ValueError(f"A GAN head reads a ScoreMLP's or a UNet's trunk; got {type(module).__name__}. "
                     "Set the GAN weight to 0 (--config.dm.gan_weight=0 / --config.ctm.gan_weight=0).")

  def features(params, x_t, t):
    x_in, t_in = parametrization.net_inputs(x_t, t, kind=net.kind, schedule=net.schedule)
    _, state = module.apply({"params": params}, x_in, t_in, None,
                            capture_intermediates=lambda m, name: m.name == last and name == "__call__",
                            mutable=["intermediates"])
    h = state["intermediates"][last]["__call__"][0]
    return h.reshape(h.shape[0], -1, h.shape[-1]).mean(axis=1) if h.ndim > 2 else h

  return features, dim


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def _time(fn, *args, repeats: int) -> tuple[np.ndarray, float]:
  out = np.asarray(jax.block_until_ready(fn(*args)))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return out, 1e3 * statistics.median(times)


def score(samples: np.ndarray, reference: np.ndarray, quality_ref: dict) -> dict:
  with jax.enable_x64(True):
    err = metrics.per_sample_error(jnp.asarray(samples, jnp.float64), jnp.asarray(reference))
  row = {"median": float(err["median"]), "rms": float(err["rms"]),
         "nan": bool(np.any(~np.isfinite(samples)))}
  if quality_ref.get("mixture") is not None:
    q = sampling.sample_quality(samples.reshape(len(samples), -1), quality_ref["mixture"])
    row.update(sliced_w2=q["sliced_w2"], sliced_w2_floor=q["sliced_w2_floor_mean"],
               mmd2=q["mmd2"], mmd2_floor=q["mmd2_floor_mean"])
    mix = quality_ref["mixture"]
    modes = metrics.mode_stats(mix, jnp.asarray(samples.reshape(len(samples), -1), jnp.float32))
    floor = _exact_mode_stats(mix, len(samples))
    row.update(mode_weight_tv=float(modes["weight_tv"]), mode_weight_tv_floor=floor["weight_tv"],
               mode_cov_error=float(modes["cov_error"]), mode_cov_error_floor=floor["cov_error"])
  return row


def _exact_mode_stats(mix, n: int) -> dict:
  """`metrics.mode_stats` of n exact samples (a fixed draw): the floor of the mode-weight and
  per-mode covariance errors at this sample size (they are not zero for exact samples)."""
  key = (n, np.asarray(mix.means).tobytes(), np.asarray(mix.eigvals).tobytes())
  if key not in _MODE_FLOORS:
    x = analytic.sample(mix, jax.random.key(4242), n)
    _MODE_FLOORS[key] = {k: float(v) for k, v in metrics.mode_stats(mix, x).items() if v.ndim == 0}
  return _MODE_FLOORS[key]


_MODE_FLOORS: dict = {}


def best_solver_row(setup: Setup, nfe: int, x_start, reference, quality_ref, *, repeats: int):
  """The teacher's best training-free solver at exactly `nfe` calls (lowest median error)."""
  best = None
  for name in setup.config.eval.solvers:
    try:
      solvers.steps_for_nfe(name, nfe)
    except ValueError:
      continue
    out, ms = _time(setup.teacher_sampler(name, nfe), x_start, repeats=repeats)
    row = {"method": f"teacher {name}", "nfe": nfe, "ms": ms, **score(out, reference, quality_ref)}
    if best is None or row["median"] < best["median"]:
      best = row
  return best


def evaluate(plan: Plan, setup: Setup, results: Results, workdir: str, *,
             progress: bool = True) -> list[dict]:
  """Scores every student and the teacher's DDIM / best solver at the students' NFEs."""
  import tqdm  # noqa: PLC0415
  config = setup.config
  x_start = setup.start_noise(jax.random.key(config.eval.seed), config.eval.num_samples)
  reference = setup.exact_map(np.asarray(x_start))
  quality_ref = {"mixture": setup.teacher.mixture}
  s = setup.teacher.schedule
  ends = {k: float(v) for k, v in (
      ("alpha_start", s.alpha(jnp.float32(setup.t_start))), ("sigma_start", s.sigma(jnp.float32(setup.t_start))),
      ("alpha_end", s.alpha(jnp.float32(setup.t_end))), ("sigma_end", s.sigma(jnp.float32(setup.t_end))))}
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  rows = []
  # the teacher's rows at the students' NFEs and at eval.teacher_nfes (e.g. a one-step
  # generator next to the teacher at 10 / 20 / 50 calls)
  # (NFE 0: samples that need no sampler, e.g. SDS / VSD particles, get no teacher rows)
  nfes = sorted({st.nfe for st in plan.students if st.nfe > 0}
                | set(config.eval.get("teacher_nfes", ())))
  for student in tqdm.tqdm(plan.students, desc="students", disable=not progress):
    params = student.params(results)
    run = jax.jit(student.run)
    out, ms = _time(run, params, x_start, repeats=config.eval.repeats)
    rows.append({"method": student.name, "nfe": student.nfe, "ms": ms,
                 **score(out, reference, quality_ref)})
    name = f"{sample_file_name(student.name)}_nfe{student.nfe}"
    np.savez(os.path.join(workdir, "samples", f"{name}.npz"),
             x_start=np.asarray(x_start), samples=out, nfe=student.nfe, **ends)
    _image_grid(workdir, name, out, f"{student.name}, NFE {student.nfe}")
  _image_grid(workdir, "reference", reference, "the teacher's exact PF-ODE map")
  panels = [("teacher, exact PF-ODE map", reference)]
  for nfe in nfes:
    out, ms = _time(setup.teacher_sampler("ddim", nfe), x_start, repeats=config.eval.repeats)
    rows.append({"method": "teacher ddim", "nfe": nfe, "ms": ms,
                 **score(out, reference, quality_ref)})
    _image_grid(workdir, f"teacher_ddim_nfe{nfe}", out, f"teacher DDIM, NFE {nfe}")
    panels += [(f"{st.name}, NFE {nfe}", np.load(os.path.join(
        workdir, "samples", f"{sample_file_name(st.name)}_nfe{nfe}.npz"))["samples"])
               for st in plan.students if st.nfe == nfe]
    panels.append((f"teacher DDIM, NFE {nfe}", out))
    best = best_solver_row(setup, nfe, x_start, reference, quality_ref, repeats=config.eval.repeats)
    if best is not None and best["method"] != "teacher ddim":
      rows.append(best)
    for name in config.eval.always:  # solvers reported at every NFE, best or not
      if f"teacher {name}" in (r["method"] for r in rows if r["nfe"] == nfe):
        continue
      try:
        solvers.steps_for_nfe(name, nfe)
      except ValueError:
        continue
      out, ms = _time(setup.teacher_sampler(name, nfe), x_start, repeats=config.eval.repeats)
      rows.append({"method": f"teacher {name}", "nfe": nfe, "ms": ms,
                   **score(out, reference, quality_ref)})
  _image_panels(os.path.join(workdir, "samples.png"), panels)
  return rows


def _image_grid(workdir: str, name: str, samples, title: str, num: int = 64) -> None:
  """For image data, samples/<name>.png: a grid of the first `num` samples (same x_start each)."""
  samples = np.asarray(samples)
  if samples.ndim == 4:
    sampling.save_figure(samples[:num], os.path.join(workdir, "samples", f"{name}.png"), title=title)


def _image_panels(path: str, panels, num: int = 16) -> None:
  """For image data, one figure: a row of grids (the first `num` samples of each panel, all from
  the same x_start), e.g. the exact map, each student and the teacher's DDIM at its NFE."""
  if not panels or np.asarray(panels[0][1]).ndim != 4:
    return
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.5))
  for ax, (title, images) in zip(np.atleast_1d(axes), panels):
    images = np.clip((np.asarray(images[:num]) + 1) / 2, 0, 1)
    cols = int(np.ceil(np.sqrt(len(images))))
    h, w, c = images.shape[1:]
    grid = np.ones((cols * (h + 1), cols * (w + 1), c), np.float32)
    for i, img in enumerate(images):
      r, q = divmod(i, cols)
      grid[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = img
    ax.imshow(grid.squeeze(-1) if c == 1 else grid, cmap="gray", interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def sample_file_name(name: str) -> str:
  """A student's name as a file name: runs of other characters than letters, digits, '-' and
  '_' become one '_' ("network copy + ipndm" -> "network_copy_ipndm")."""
  return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")


def table(rows: list[dict]) -> str:
  """Markdown: one line per (method, NFE); distribution and mode columns where they were scored."""
  has_q = any("sliced_w2" in r for r in rows)
  has_modes = any("mode_cov_error" in r for r in rows)
  head = "| method | NFE | coupling error median | RMS |"
  head += " sliced W2 (floor) | MMD² (floor) |" if has_q else ""
  head += " mode weight TV (floor) | mode cov error (floor) |" if has_modes else ""
  lines = [head + " ms |", "|---|---:|---:|---:|" + ("---:|---:|" if has_q else "")
           + ("---:|---:|" if has_modes else "") + "---:|"]
  for r in sorted(rows, key=lambda r: (r["nfe"], r["method"].startswith("teacher"), r["median"])):
    line = f"| {r['method']} | {r['nfe']} | {r['median']:.2e} | {r['rms']:.2e} |"
    if has_q:
      line += (f" {r['sliced_w2']:.3f} ({r['sliced_w2_floor']:.3f}) | {r['mmd2']:.1e} "
               f"({r['mmd2_floor']:.0e}) |")
    if has_modes:
      line += (f" {r['mode_weight_tv']:.3f} ({r['mode_weight_tv_floor']:.3f}) |"
               f" {r['mode_cov_error']:.3f} ({r['mode_cov_error_floor']:.3f}) |")
    lines.append(line + f" {r['ms']:.1f} |" + (" NaN!" if r.get("nan") else ""))
  return "\n".join(lines) + "\n"


def figure(rows: list[dict], setup: Setup, workdir: str, title: str) -> None:
  """Coupling error vs NFE for students and the teacher; for 2-D data, student samples too."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for name in dict.fromkeys(r["method"] for r in rows):
    pts = sorted((r["nfe"], r["median"]) for r in rows if r["method"] == name and r["nfe"] > 0)
    if not pts:
      continue
    teacher = name.startswith("teacher")
    ax.loglog(*zip(*pts), marker="o" if not teacher else "s", ls="--" if teacher else "-",
              label=name, ms=4)
  ax.set_xlabel("NFE")
  ax.set_ylabel("median per-sample error vs the exact flow map")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "distill.png"), dpi=110)
  plt.close(fig)


__all__ = ["Net", "make_net", "trunk_features", "SeededBatches", "MixtureBatches", "Keys", "Stage", "Student", "Plan", "Setup",
           "make_setup", "make_player", "run_stages", "evaluate", "table", "figure", "score"]
