"""FD-digits and the digits IS: FID and the Inception Score on scikit-learn's 8x8 digits (digits8),
with a small classifier trained in the project standing in for Inception.

FID needs a network whose features see what makes an image a sample of the data; for 8x8 digits
Inception (trained on 299x299 photographs) is the wrong one, and no public network exists. So the
library trains its own, in seconds on a CPU, deterministically from a seed:

    conv 3x3, 32 (ReLU) -> conv 3x3 stride 2, 64 (ReLU) -> dense 64 (ReLU) = features -> dense 10

on the digits8 train split (1500 images), with the augmentations a generated digit differs by
(shifts of one pixel, Gaussian noise of std up to 0.1, so that continuous-valued samples are not
out of distribution for a classifier of 17-level images). Then

  FD-digits  = the Frechet distance (FID's formula, float64) between the 64-D features of the
               samples and those of the reference set (by default the train split);
  digits IS  = exp(E_x KL(p(y|x) || p(y))) from the 10 logits (at most 10, for 10 equally frequent
               classes each predicted with certainty).

FD is biased upward at small sample counts, so an FD is comparable only to one computed from the
same number of samples; `DigitsScorer.floor(n)` gives the value of held-out real digits (the test
split) at the same n, which is what a perfect generator would score.

    params = digits.classifier("runs/digits_classifier.npz")   # loads, or trains (~10 s) and saves
    scorer = digits.DigitsScorer(params)                      # reference: the train split
    scorer.score(samples)                                      # {"fd_digits": ..., "is_digits": ...}

References: Heusel et al., GANs Trained by a Two Time-Scale Update Rule, NeurIPS 2017 (FID);
Salimans et al., Improved Techniques for Training GANs, NeurIPS 2016 (IS).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import _validate
from diffdistill.metrics import frechet, image

Array = jax.Array

FEATURES = 64
NUM_CLASSES = 10
_SHAPE = (8, 8, 1)


def init_classifier(rng: Array) -> dict:
  """He-initialised weights of the classifier (a dict of arrays, float32)."""
  ks = jax.random.split(rng, 4)

  def he(k, shape, fan_in):
    return jax.random.normal(k, shape, jnp.float32) * np.sqrt(2.0 / fan_in)

  return {"conv1": {"w": he(ks[0], (3, 3, 1, 32), 9), "b": jnp.zeros(32)},
          "conv2": {"w": he(ks[1], (3, 3, 32, 64), 9 * 32), "b": jnp.zeros(64)},
          "dense": {"w": he(ks[2], (4 * 4 * 64, FEATURES), 4 * 4 * 64), "b": jnp.zeros(FEATURES)},
          "head": {"w": he(ks[3], (FEATURES, NUM_CLASSES), FEATURES) / np.sqrt(2.0),
                   "b": jnp.zeros(NUM_CLASSES)}}


def _conv(x, p, stride):
  y = jax.lax.conv_general_dilated(x, p["w"], (stride, stride), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(y + p["b"])


@jax.jit
def _outputs(params, x):
  h = _conv(x, params["conv1"], 1)             # [B, 8, 8, 32]
  h = _conv(h, params["conv2"], 2)             # [B, 4, 4, 64]
  feats = jax.nn.relu(h.reshape(h.shape[0], -1) @ params["dense"]["w"] + params["dense"]["b"])
  return feats, feats @ params["head"]["w"] + params["head"]["b"]


def _images(name: str, x) -> Array:
  x = jnp.asarray(x)
  if x.ndim == 2 and x.shape[1] == 64:
    x = x.reshape(-1, *_SHAPE)
  if x.ndim != 4 or tuple(x.shape[1:]) != _SHAPE or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be float digits8 images [N, 8, 8, 1] (or [N, 64]) in [-1, 1], "
                     f"got shape {x.shape} dtype {x.dtype}.")
  if _validate.is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
    raise ValueError(f"{name} has non-finite values ({int(jnp.sum(~jnp.isfinite(x)))} entries).")
  return x.astype(jnp.float32)


def classifier_outputs(params: dict, x, *, batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, 64], logits [N, 10]) of images x [N, 8, 8, 1] in [-1, 1] (numpy, float32)."""
  x = _images("x", x)
  feats, logits = [], []
  for i in range(0, x.shape[0], batch_size):
    f, l = _outputs(params, x[i:i + batch_size])
    feats.append(np.asarray(f))
    logits.append(np.asarray(l))
  return np.concatenate(feats), np.concatenate(logits)


def _augment(rng, x):
  """Random shifts of -1, 0 or 1 pixel per axis (the background, -1, fills in) and Gaussian noise
  of a per-image std uniform in [0, 0.1]."""
  k_shift, k_std, k_noise = jax.random.split(rng, 3)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  shifts = jax.random.randint(k_shift, (x.shape[0], 2), 0, 3)
  crop = jax.vmap(lambda im, s: jax.lax.dynamic_slice(im, (s[0], s[1], 0), _SHAPE))
  std = jax.random.uniform(k_std, (x.shape[0], 1, 1, 1), maxval=0.1)
  return crop(padded, shifts) + std * jax.random.normal(k_noise, x.shape)


def train_classifier(*, seed: int = 0, num_steps: int = 2000, batch_size: int = 128,
                     learning_rate: float = 2e-3) -> tuple[dict, dict]:
  """Trains the classifier on the digits8 train split (Adam with cosine decay, cross-entropy,
  `_augment`); returns (params, info) with the test-split accuracy and the wall time."""
  import optax  # noqa: PLC0415
  from diffdistill.data import digits8  # noqa: PLC0415 (scikit-learn, loaded only here)
  _validate.check_int("num_steps", num_steps, min=1)
  _validate.check_int("batch_size", batch_size, min=1)
  t0 = time.perf_counter()
  x_train, y_train = (jnp.asarray(a) for a in digits8.load_split("train"))
  x_test, y_test = digits8.load_split("test")
  rng_init, rng = jax.random.split(jax.random.key(seed))
  params = init_classifier(rng_init)
  opt = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))
  state = opt.init(params)

  def loss_fn(p, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_outputs(p, x)[1], y))

  @jax.jit
  def step(p, s, key):
    k_idx, k_aug = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch_size,), 0, x_train.shape[0])
    grads = jax.grad(loss_fn)(p, _augment(k_aug, x_train[idx]), y_train[idx])
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  for key in jax.random.split(rng, num_steps):
    params, state = step(params, state, key)
  params = jax.tree.map(np.asarray, params)
  test_acc = float(np.mean(np.argmax(classifier_outputs(params, x_test)[1], axis=1) == y_test))
  train_acc = float(np.mean(np.argmax(classifier_outputs(params, x_train)[1], axis=1)
                            == np.asarray(y_train)))
  return params, {"seed": seed, "num_steps": num_steps, "batch_size": batch_size,
                  "learning_rate": learning_rate, "test_accuracy": test_acc,
                  "train_accuracy": train_acc, "seconds": time.perf_counter() - t0}


def save_classifier(path: str, params: dict, info: dict) -> None:
  """Writes params and info to an `.npz` (atomically: a temporary file renamed into place)."""
  flat = {f"{layer}/{name}": np.asarray(v) for layer, d in params.items() for name, v in d.items()}
  tmp = f"{path}.tmp.npz"
  np.savez(tmp, info=json.dumps(info), **flat)
  os.replace(tmp, path)


def load_classifier(path: str) -> tuple[dict, dict]:
  """(params, info) from an `.npz` written by `save_classifier`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No digits classifier at {path!r}: `digits.classifier(path)` trains "
                            "one (~10 s on a CPU) and saves it there.")
  with np.load(path) as f:
    info = json.loads(str(f["info"]))
    params: dict = {}
    for key in f.files:
      if key != "info":
        layer, name = key.split("/")
        params.setdefault(layer, {})[name] = f[key]
  expected = jax.tree.map(np.shape, init_classifier(jax.random.key(0)))
  if jax.tree.map(np.shape, params) != expected:
    raise ValueError(f"{path!r} is not a digits classifier of this version (its arrays' shapes "
                     f"are {jax.tree.map(np.shape, params)}, expected {expected}).")
  return params, info


def classifier(path: str | None = None, *, seed: int = 0, verbose: bool = True) -> dict:
  """The classifier's params: loaded from `path` if it exists, else trained (`train_classifier`,
  seed `seed`) and saved there (not saved if path is None)."""
  if path is not None and os.path.exists(path):
    return load_classifier(path)[0]
  params, info = train_classifier(seed=seed)
  if verbose:
    print(f"digits classifier trained in {info['seconds']:.1f} s: test accuracy "
          f"{info['test_accuracy']:.4f}" + (f", saved to {path}" if path else ""))
  if path is not None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_classifier(path, params, info)
  return params


def digits_inception_score(logits, *, num_splits: int = 1) -> float:
  """exp(E KL(p(y|x) || p(y))) over the samples (one split by default: digit sets are small)."""
  return float(image.inception_score(jnp.asarray(logits), num_splits=num_splits)[0])


class DigitsScorer:
  """FD-digits and digits IS of sample sets against a reference set's features.

  reference: images [N, 8, 8, 1] in [-1, 1]; default the digits8 train split (1500 images).
  """

  def __init__(self, params: dict, reference=None):
    from diffdistill.data import digits8  # noqa: PLC0415
    self.params = params
    if reference is None:
      reference = digits8.load_split("train")[0]
    feats, _ = classifier_outputs(params, _images("reference", reference))
    self.mu, self.sigma = frechet.StreamingMoments().update(jnp.asarray(feats)).statistics()

  def frechet(self, samples) -> float:
    """FD-digits of `samples` against the reference (needs at least 2 samples)."""
    feats, _ = classifier_outputs(self.params, _images("samples", samples))
    mu, sigma = frechet.StreamingMoments().update(jnp.asarray(feats)).statistics()
    return frechet.frechet_distance_float64(mu, sigma, self.mu, self.sigma)

  def score(self, samples) -> dict:
    """{"fd_digits", "is_digits"} of one sample set."""
    _, logits = classifier_outputs(self.params, _images("samples", samples))
    return {"fd_digits": self.frechet(samples), "is_digits": digits_inception_score(logits)}

  def floor(self, n: int, *, num_draws: int = 10, seed: int = 0) -> dict:
    """FD-digits and IS of `num_draws` random n-subsets of the held-out test split (297 images):
    what exact samples score at this sample count. {"fd_mean", "fd_std", "is_mean"}."""
    from diffdistill.data import digits8  # noqa: PLC0415
    x_test = digits8.load_split("test")[0]
    _validate.check_int("n", n, min=2, max=len(x_test))
    rng = np.random.default_rng(seed)
    rows = [self.score(x_test[rng.choice(len(x_test), n, replace=False)]) for _ in range(num_draws)]
    fd = np.array([r["fd_digits"] for r in rows])
    return {"fd_mean": float(fd.mean()), "fd_std": float(fd.std(ddof=1)) if num_draws > 1 else 0.0,
            "is_mean": float(np.mean([r["is_digits"] for r in rows])), "n": n}


__all__ = ["FEATURES", "init_classifier", "classifier_outputs", "train_classifier",
           "save_classifier", "load_classifier", "classifier", "digits_inception_score",
           "DigitsScorer"]
