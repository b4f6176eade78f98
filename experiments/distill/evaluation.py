"""Scores a plan's students: every student maps the same N samples x_start of the teacher's
marginal at t_start to t_end with its NFE; each is scored against the exact probability-flow map
of x_start (analytic teachers: `analytic.flow_map` of the exact denoiser, float64; trained
teachers: the teacher's own adaptive solve, float32) and, as a distribution, against exact samples
(sliced W2, MMD^2, mode weights and per-mode covariances, with their exact-vs-exact floors) or, for
digits teachers, against the data (FD-digits and digits IS, `metrics.digits`, with held-out
digits' FD at the same sample count as floor), next to the teacher's DDIM and its best
training-free solver at the same NFE. Each student's samples go
to `samples/<student>_nfe<k>.npz`.

A conditional teacher (`config.teacher.conditional`) gets one label per sample (`setup.labels`),
the same for its exact map, its solvers and every student; they are saved as `labels`.

A latent teacher (`config.teacher.vae`) is coupled in latent space; its students' samples are
also decoded, into the same file's `images` (NHWC in [-1, 1]: what `experiments.evaluate` scores)
and into the figures. With `config.eval.fid.reference` and `.inception` set, every student gets
FID as the papers compute it (`FIDScorer`): its own `eval.fid.num_samples` samples from fresh
noise, streamed in batches (memory independent of the count), decoded, quantised to uint8 as
EDM's and DiT's samplers save their images, against the reference statistics.

A sampler that re-noises between calls (multistep consistency sampling, gamma > 0) maps x_start to
a sample that also depends on fresh noise: its distance to the exact map of x_start is not a
measure of it. Every student is therefore run a second time with other noise; where the samples
differ, its row says `renoised` and the tables mark its coupling error (read its distribution
columns instead).
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import metrics, solvers
from diffdistill.metrics import digits as digits_metric
from diffdistill.metrics import inception as inception_eval
from diffdistill.methods.plan import Plan, Results, file_name
from experiments.train_teacher import sampling


def _time(fn, *args, repeats: int) -> tuple[np.ndarray, float]:
  out = np.asarray(jax.block_until_ready(fn(*args)))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return out, 1e3 * statistics.median(times)


def renoises(run, params, x_start, out, *, seed: int = 1) -> bool:
  """Whether run(params, x_start, rng) depends on rng: `out` (its samples with rng None) differs
  from a draw with rng key(seed)."""
  return not np.array_equal(np.asarray(out), np.asarray(run(params, x_start, jax.random.key(seed))))


def score(samples: np.ndarray, reference: np.ndarray, quality_ref: dict) -> dict:
  """A row: the coupling to `reference` (median, RMS), and the distribution columns: against an
  exact mixture (`metrics.mixture_scores`) or the digits data (FD-digits, its floor, digits IS,
  `quality_reference`; of the decoded images for a latent teacher), where `quality_ref` holds
  one."""
  with jax.enable_x64(True):
    err = metrics.per_sample_error(jnp.asarray(samples, jnp.float64), jnp.asarray(reference))
  row = {"median": float(err["median"]), "rms": float(err["rms"]),
         "nan": bool(np.any(~np.isfinite(samples)))}
  if quality_ref.get("mixture") is not None:
    row.update(metrics.mixture_scores(samples, quality_ref["mixture"]))
  if quality_ref.get("digits") is not None:
    scorer, floor, exact = quality_ref["digits"]
    row.update(scorer.score(quality_ref.get("decode", np.asarray)(samples)),
               fd_digits_floor=floor["fd_mean"],
               fd_digits_floor_std=floor["fd_std"], fd_digits_floor_n=floor["n"],
               fd_digits_exact=exact)
  return row


def digits_reference(config, reference: np.ndarray):
  """(scorer, floor at the evaluation's sample count, FD-digits of the teacher's exact map)."""
  scorer = digits_metric.DigitsScorer(digits_metric.classifier(config.eval.digits_classifier))
  n = min(len(reference), 297)  # the held-out split's size
  return scorer, scorer.floor(n), scorer.frechet(reference)


def quality_reference(setup, reference: np.ndarray) -> dict:
  """What `score` scores distributions against: the exact mixture, or the digits data."""
  if setup.teacher.mixture is None and setup.config.teacher.get("dataset") == "digits8":
    # (a latent teacher's samples are scored as the images they decode to)
    return {"digits": digits_reference(setup.config, setup.decode(reference)),
            "decode": setup.decode}
  return {"mixture": setup.teacher.mixture}


def best_solver_row(setup, nfe: int, x_start, reference, quality_ref, *, repeats: int,
                    labels=None):
  """The teacher's best training-free solver at exactly `nfe` calls (lowest median error); a
  conditional teacher's at `labels`."""
  best = None
  for name in setup.config.eval.solvers:
    try:
      solvers.steps_for_nfe(name, nfe)
    except ValueError:
      continue
    out, ms = _time(setup.teacher_sampler(name, nfe, labels=labels), x_start, repeats=repeats)
    row = {"method": f"teacher {name}", "nfe": nfe, "ms": ms, **score(out, reference, quality_ref)}
    if best is None or row["median"] < best["median"]:
      best = row
  return best


def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] as the papers' samplers write them to PNG before FID:
  clip(127.5 x + 128, 0, 255) truncated to uint8 (EDM's generate.py; DiT's sample_ddp.py the
  same up to rounding)."""
  return np.clip(np.asarray(images, np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)


class FIDScorer:
  """FID of a sampler against reference statistics (config.eval.fid): `num_samples` samples in
  batches from noise seeded by (fid.seed, batch), the same noise for every student (and, for a
  conditional teacher, the same uniformly drawn labels)."""

  def __init__(self, setup):
    from diffdistill.nets import inception as inception_net  # noqa: PLC0415
    self.setup, self.c = setup, setup.config.eval.fid
    check_fid_config(setup)
    self.variables = inception_net.load_inception(self.c.inception)
    self.mu_ref, self.sigma_ref = metrics.load_statistics(self.c.reference)

  def __call__(self, run, params, *, desc: str = "FID", progress: bool = True) -> dict:
    import tqdm  # noqa: PLC0415
    c, setup = self.c, self.setup
    moments = metrics.StreamingMoments()
    with tqdm.tqdm(total=c.num_samples, desc=desc, unit="img", disable=not progress) as bar:
      for i, start in enumerate(range(0, c.num_samples, c.batch_size)):
        key = jax.random.fold_in(jax.random.key(c.seed), i)
        x = setup.start_noise(key, min(c.batch_size, c.num_samples - start))
        labels = setup.labels(jax.random.fold_in(key, 2), len(x))
        cond = {} if labels is None else {"label": labels}
        images = to_uint8(setup.decode(np.asarray(run(params, x, jax.random.fold_in(key, 1),
                                                      **cond))))
        if images.shape[-1] == 1:  # grayscale as RGB, as pytorch-fid's loader converts it
          images = np.repeat(images, 3, axis=-1)
        for pool3, _, mask in inception_eval.inception_outputs(self.variables, images,
                                                               batch_size=c.batch_size):
          moments.update(pool3, mask=mask)
        bar.update(len(images))
    mu, sigma = moments.statistics()
    return {"fid": metrics.frechet_distance_float64(mu, sigma, self.mu_ref, self.sigma_ref),
            "fid_num_samples": int(moments.count)}


def check_fid_config(setup) -> None:
  """config.eval.fid, checked before anything is trained."""
  c = setup.config.eval.fid
  if not (c.reference or c.inception):
    return
  for key in ("reference", "inception"):
    if not c[key]:
      raise ValueError(f"config.eval.fid.{key} is empty: FID needs both reference statistics "
                       "(.npz / .pkl with mu, sigma) and Inception weights (NVIDIA's .pkl, "
                       "pytorch-fid's .pth, or an .npz conversion); docs/metrics.md.")
  for key in ("reference", "inception"):
    if not os.path.exists(c[key]):
      raise FileNotFoundError(f"config.eval.fid.{key}={c[key]!r} does not exist.")
  for key in ("num_samples", "batch_size"):
    v = c[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
      raise ValueError(f"config.eval.fid.{key} must be an integer >= 2, got {v!r}.")
  shape = tuple(setup.teacher.example_shape)
  if not setup.latent and (len(shape) != 3 or shape[-1] not in (1, 3)):
    raise ValueError(f"config.eval.fid: FID scores images; the teacher's samples have shape "
                     f"{shape} (a latent teacher needs config.teacher.vae to decode them).")


def evaluate(plan: Plan, setup, results: Results, workdir: str, *,
             progress: bool = True) -> list[dict]:
  """Scores every student and the teacher's DDIM / best solver at the students' NFEs."""
  import tqdm  # noqa: PLC0415
  config = setup.config
  x_start = setup.start_noise(jax.random.key(config.eval.seed), config.eval.num_samples)
  # a conditional teacher's labels, one per sample, the same for the teacher and every student
  labels = setup.labels(jax.random.key(config.eval.seed + 17), config.eval.num_samples)
  cond = {} if labels is None else {"label": labels}
  reference = setup.exact_map(np.asarray(x_start), labels)
  quality_ref = quality_reference(setup, reference)
  fid = FIDScorer(setup) if config.eval.fid.reference else None
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
    run = jax.jit(lambda p, x, rng=None, _s=student: _s.run(p, x, rng, **cond))
    out, ms = _time(run, params, x_start, repeats=config.eval.repeats)
    rows.append({"method": student.name, "nfe": student.nfe, "ms": ms,
                 "renoised": renoises(run, params, x_start, out, seed=config.eval.seed + 1),
                 **score(out, reference, quality_ref)})
    if fid is not None:
      rows[-1].update(fid(jax.jit(student.run), params,
                          desc=f"FID {student.name} NFE {student.nfe}", progress=progress))
    name = f"{file_name(student.name)}_nfe{student.nfe}"
    images = setup.decode(out)
    np.savez(os.path.join(workdir, "samples", f"{name}.npz"),
             x_start=np.asarray(x_start), samples=out, nfe=student.nfe, **ends,
             **({"images": images} if setup.latent else {}),
             **({} if labels is None else {"labels": np.asarray(labels)}))
    _image_grid(workdir, name, images, f"{student.name}, NFE {student.nfe}")
  reference_images = setup.decode(reference)
  _image_grid(workdir, "reference", reference_images, "the teacher's exact PF-ODE map")
  panels = [("teacher, exact PF-ODE map", reference_images)]
  for nfe in nfes:
    out, ms = _time(setup.teacher_sampler("ddim", nfe, labels=labels), x_start,
                    repeats=config.eval.repeats)
    rows.append({"method": "teacher ddim", "nfe": nfe, "ms": ms,
                 **score(out, reference, quality_ref)})
    out = setup.decode(out)
    _image_grid(workdir, f"teacher_ddim_nfe{nfe}", out, f"teacher DDIM, NFE {nfe}")
    panels += [(f"{st.name}, NFE {nfe}", _images(os.path.join(
        workdir, "samples", f"{file_name(st.name)}_nfe{nfe}.npz")))
               for st in plan.students if st.nfe == nfe]
    panels.append((f"teacher DDIM, NFE {nfe}", out))
    best = best_solver_row(setup, nfe, x_start, reference, quality_ref, repeats=config.eval.repeats,
                           labels=labels)
    if best is not None and best["method"] != "teacher ddim":
      rows.append(best)
    for name in config.eval.always:  # solvers reported at every NFE, best or not
      if f"teacher {name}" in (r["method"] for r in rows if r["nfe"] == nfe):
        continue
      try:
        solvers.steps_for_nfe(name, nfe)
      except ValueError:
        continue
      out, ms = _time(setup.teacher_sampler(name, nfe, labels=labels), x_start,
                      repeats=config.eval.repeats)
      rows.append({"method": f"teacher {name}", "nfe": nfe, "ms": ms,
                   **score(out, reference, quality_ref)})
  _image_panels(os.path.join(workdir, "samples.png"), panels)
  return rows


def _images(path: str) -> np.ndarray:
  """A samples file's images: the decoded `images` of a latent run, else its `samples`."""
  with np.load(path) as f:
    return f["images"] if "images" in f.files else f["samples"]


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


__all__ = ["evaluate", "score", "best_solver_row", "FIDScorer", "check_fid_config", "to_uint8"]
