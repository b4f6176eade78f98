"""In-memory batch sources: exact samples of a mixture and prior noise, resumable in O(1).

Training on an analytic teacher needs no dataset files: its data law is known, so each batch is
drawn fresh from a generator seeded by (seed, step). Every source here is an iterator of numpy
batches with the pipeline's resume protocol (`get_state` / `set_state`, JSON-serialisable), so
`train.loop.run` checkpoints and resumes it exactly like a TFDS `Pipeline`:

    data = batches.MixtureBatches(analytic.mixture64(), batch_size=512, seed=0)
    batch = next(data)                  # {"x": float32 [512, 64]}
    data.set_state({"step": 100})       # the batch of step 100 comes next, drawn in O(1)
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from diffdistill import analytic


class SeededBatches(Iterator[dict]):
  """Batches drawn from PCG64([seed, s]) at step s: resumable in O(1). Subclasses give `draw`."""

  def __init__(self, batch_size: int, seed: int):
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    self.batch_size, self.seed, self.step = int(batch_size), seed, 0

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


class PriorNoise(SeededBatches):
  """Batches {"x_T": scale * z}, z ~ N(0, I) of `shape`: a data-free input (BOOT's)."""

  def __init__(self, scale: float, shape: Sequence[int], batch_size: int, seed: int):
    super().__init__(batch_size, seed)
    self.scale, self.shape = scale, tuple(shape)

  def draw(self, rng):
    z = rng.standard_normal((self.batch_size, *self.shape))
    return {"x_T": (self.scale * z).astype(np.float32)}


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


class Mapped(Iterator[dict]):
  """Batches of another iterator with `fn(batch[key], seed, step) -> array` in place of
  batch[key] (e.g. images -> the latents of an autoencoder, drawn from its posterior with a
  seed that depends on (seed, step) only). The state is the inner state and the step, so a
  resumed run maps the same batches with the same draws."""

  def __init__(self, data, key: str, fn, seed: int):
    self._data, self._key, self._fn, self.seed, self.step = data, key, fn, seed, 0

  def __next__(self):
    batch = dict(next(self._data))
    batch[self._key] = self._fn(batch[self._key], self.seed, self.step)
    self.step += 1
    return batch

  def get_state(self):
    return {"data": self._data.get_state(), "step": self.step}

  def set_state(self, state):
    self._data.set_state(state["data"])
    self.step = int(state["step"])

  def close(self):
    getattr(self._data, "close", lambda: None)()


__all__ = ["SeededBatches", "MixtureBatches", "PriorNoise", "Keys", "Mapped"]
