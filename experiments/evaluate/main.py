"""FID, Inception Score, precision/recall and KID of generated samples, as the papers compute them.

COMMAND (from the repository root):
  python -m experiments.evaluate.main --samples=runs/distill/samples --reference=fid-refs/cifar10-32x32.npz --inception=pt_inception-2015-12-05-6726825d.pth --output=runs/distill/evaluate.json

Inputs:
  --samples     one samples .npz (key `images` or `samples`, NHWC in [-1, 1]: a latent run's
                decoded `images` are taken before its latent `samples`; or `arr_0`, uint8 NHWC,
                ADM's sample batches) or a folder of them (e.g. an experiments/distill workdir's
                samples/, one <student>_nfe<k>.npz per budget): each file is scored on its own.
                Grayscale [N, H, W, 1] samples are repeated to RGB.
  --reference   FID reference statistics (pytorch-fid / EDM .npz or .pkl with mu, sigma; ADM's
                VIRTUAL_*.npz, whose arr_0 images also serve as the real set of P/R and KID).
  --reference_images  optional real images (.npz, key `samples` or `arr_0`) for P/R and KID when
                the reference file has none; without either, only FID and IS are reported.
  --inception   pytorch-fid's pt_inception-2015-12-05-*.pth, NVIDIA's inception-2015-12-05.pkl
                (EDM / StyleGAN; its own resize and normalisation, docs/metrics.md) or
                StyleGAN2-ADA's .pt (these need torch), or an .npz conversion (`python -m
                diffdistill.nets.inception IN OUT.npz`); never downloaded. Score against reference
                statistics of the same port.
Runtime: the Inception forward dominates: 1.7 images/s measured on 2 CPU cores shared with other
jobs (load 12; bench/fid.md), so 50k samples are a GPU/TPU job. FID streams the moments (O(2048^2) memory); IS keeps the logits of every
sample and P/R / KID the pool3 features of the first --num_feature_samples samples of each set.

Reference statistics with this Inception (what FID against real data needs: the same port for both
sides), from real images in one .npz:
  python -m experiments.evaluate.main --samples=cifar10_train.npz --inception=... \
      --statistics_out=cifar10_train_stats.npz

Writes a JSON (default <samples>.evaluate.json, or evaluate.json inside a samples folder) with one
entry per samples file, the command and the inputs.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
import jax
import numpy as np
from tqdm import tqdm

from diffdistill import metrics
from diffdistill.metrics import inception as inception_eval
from diffdistill.nets import inception as inception_net


def _define_flags():
  """Only when run as the program (tests call `evaluate` directly)."""
  flags.DEFINE_string("samples", None, "A samples .npz or a folder of them.", required=True)
  flags.DEFINE_string("reference", None, "FID reference statistics (.npz / .pkl).")
  flags.DEFINE_string("statistics_out", None, "Write the FID statistics (mu, sigma) of --samples "
                      "(one .npz of real images) here instead of scoring it.")
  flags.DEFINE_string("reference_images", None, "Real images (.npz) for P/R and KID.")
  flags.DEFINE_string("inception", None, "Inception weights (.pth, .pkl, .pt or .npz).",
                      required=True)
  flags.DEFINE_string("output", None, "The JSON to write (default: beside the samples).")
  flags.DEFINE_integer("batch_size", 250, "Images per Inception batch (all devices together).")
  flags.DEFINE_integer("num_feature_samples", 10_000, "Samples per set for P/R and KID.")
  flags.DEFINE_integer("is_splits", 10, "Inception Score splits.")
  flags.DEFINE_integer("kid_subsets", 100, "KID subsets.")
  flags.DEFINE_integer("kid_subset_size", 1000, "KID subset size.")
  flags.DEFINE_integer("seed", 0, "Seed of KID's subsets.")


def read_images(path: str) -> np.ndarray:
  """NHWC images of a samples .npz: key `images` (a latent run's decoded samples) or `samples`
  (float in [-1, 1]), or `arr_0` (uint8); one channel is repeated to RGB."""
  with np.load(path) as f:
    for key in ("images", "samples", "arr_0"):
      if key in f.files:
        images = f[key]
        break
    else:
      raise ValueError(f"{path} has neither `samples` nor `arr_0` (keys: {f.files}).")
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"{path}: samples must be NHWC images [N, H, W, 3] (or 1 channel); got shape "
                     f"{images.shape} (vectors have no Inception features; latents must be "
                     "decoded first: experiments/distill does so with --config.teacher.vae).")
  if images.shape[-1] == 1:  # grayscale as RGB, as pytorch-fid's loader converts it
    images = np.repeat(images, 3, axis=-1)
  return images


def sample_files(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npz"))
    if not files:
      raise ValueError(f"No .npz samples in {path}.")
    return files
  if not os.path.exists(path):
    raise FileNotFoundError(f"No samples at {path}.")
  return [path]


def _outputs(variables, images, *, batch_size, num_features, desc):
  """(streamed moments, all logits [N, 1008], pool3 of the first num_features samples)."""
  moments, logits, feats, kept = metrics.StreamingMoments(), [], [], 0
  with tqdm(total=len(images), desc=desc, unit="img", file=sys.stderr) as bar:
    for pool3, lg, mask in inception_eval.inception_outputs(variables, images,
                                                            batch_size=batch_size):
      moments.update(pool3, mask=mask)
      n = int(np.asarray(mask).sum())
      logits.append(np.asarray(lg)[:n])
      if kept < num_features:
        feats.append(np.asarray(pool3)[:min(n, num_features - kept)])
        kept += feats[-1].shape[0]
      bar.update(n)
  return (moments, np.concatenate(logits),
          np.concatenate(feats) if feats else np.zeros((0, 2048), np.float32))


def evaluate(*, samples: str, reference: str, inception: str, reference_images: str | None = None,
             output: str | None = None, batch_size: int = 250, num_feature_samples: int = 10_000,
             is_splits: int = 10, kid_subsets: int = 100, kid_subset_size: int = 1000,
             seed: int = 0) -> dict:
  """Scores every samples file; writes and returns the JSON's content."""
  files = sample_files(samples)
  variables = inception_net.load_inception(inception)
  mu_ref, sigma_ref = metrics.load_statistics(reference)
  real_path = reference_images
  if real_path is None and reference.endswith(".npz"):
    with np.load(reference) as f:
      real_path = reference if "arr_0" in f.files else None
  real = None
  if real_path is not None:
    _, _, real = _outputs(variables, read_images(real_path), batch_size=batch_size,
                          num_features=num_feature_samples, desc="reference")
  results = {}
  for path in files:
    start = time.time()
    images = read_images(path)
    moments, logits, feats = _outputs(variables, images, batch_size=batch_size,
                                      num_features=num_feature_samples,
                                      desc=os.path.basename(path))
    mu, sigma = moments.statistics()
    is_mean, is_std = metrics.inception_score(logits, num_splits=is_splits)
    row = {"num_samples": int(moments.count),
           "fid": metrics.frechet_distance_float64(mu, sigma, mu_ref, sigma_ref),
           "is_mean": float(is_mean), "is_std": float(is_std)}
    if real is not None:
      pr = metrics.precision_recall(real, feats, k=3)
      kid = metrics.kernel_inception_distance(real, feats, rng=jax.random.key(seed),
                                              num_subsets=kid_subsets, subset_size=kid_subset_size)
      row.update({k: float(v) for k, v in pr.items()})
      row.update({"kid_mean": float(kid[0]), "kid_std": float(kid[1]),
                  "num_feature_samples": [int(real.shape[0]), int(feats.shape[0])]})
    row["seconds"] = round(time.time() - start, 2)
    results[os.path.basename(path)] = row
  out = {"command": " ".join(sys.argv), "samples": samples, "reference": reference,
         "reference_images": real_path, "inception": inception,
         "inception_port": inception_net.port_of(variables), "results": results}
  if output is None:
    output = (os.path.join(samples, "evaluate.json") if os.path.isdir(samples)
              else os.path.splitext(samples)[0] + ".evaluate.json")
  with open(output, "w") as f:
    json.dump(out, f, indent=2)
  return out


def write_statistics(*, samples: str, inception: str, output: str, batch_size: int = 250) -> dict:
  """FID reference statistics (pytorch-fid's .npz: mu, sigma) of the images in one .npz."""
  if not output.endswith(".npz"):
    raise ValueError(f"statistics_out must end in .npz (pytorch-fid's format), got {output!r}.")
  if os.path.isdir(samples):
    raise ValueError(f"--samples must be one .npz of images for --statistics_out, got the folder "
                     f"{samples!r}.")
  images = read_images(samples)
  moments, _, _ = _outputs(inception_net.load_inception(inception), images,
                           batch_size=batch_size, num_features=0, desc=os.path.basename(samples))
  mu, sigma = moments.statistics()
  metrics.save_statistics(output, np.asarray(mu, np.float64), np.asarray(sigma, np.float64))
  return {"num_samples": int(moments.count), "output": output}


def main(argv):
  del argv
  f = flags.FLAGS
  if f.statistics_out:
    print(json.dumps(write_statistics(samples=f.samples, inception=f.inception,
                                      output=f.statistics_out, batch_size=f.batch_size)))
    return
  if not f.reference:
    raise app.UsageError("--reference is required (or --statistics_out to write statistics).")
  out = evaluate(samples=f.samples, reference=f.reference, inception=f.inception,
                 reference_images=f.reference_images, output=f.output, batch_size=f.batch_size,
                 num_feature_samples=f.num_feature_samples, is_splits=f.is_splits,
                 kid_subsets=f.kid_subsets, kid_subset_size=f.kid_subset_size, seed=f.seed)
  print(json.dumps(out["results"], indent=2))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
