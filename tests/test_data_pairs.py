"""Teacher pairs: chunked generation that resumes after a kill, read back through the pipeline."""

import os

import numpy as np
import pytest

from diffdistill.data import pairs, pipeline


def noise(i, n=64):
  return np.random.default_rng(i).standard_normal((n, 3)).astype(np.float32)


def test_pairs_round_trip_and_resume(tmp_path):
  calls = []

  def sample_fn(x):
    calls.append(len(x))
    return 2.0 * x + 1.0

  directory = str(tmp_path / "pairs")
  # a "killed" first run: only chunk 1 was written
  os.makedirs(os.path.join(directory, "chunks"))
  pairs._write_chunk(os.path.join(directory, "chunks", "chunk_00001.npz"), noise(1), 2 * noise(1) + 1)
  source = pairs.generate(sample_fn, noise, directory=directory, num_pairs=150, chunk_size=64,
                          progress=False)
  assert calls == [64, 64]  # chunks 0 and 2 only
  assert len(source) == 150
  got = source.read(np.arange(150))
  want_T = np.concatenate([noise(0), noise(1), noise(2)])[:150]
  np.testing.assert_array_equal(got["x_T"], want_T)
  np.testing.assert_allclose(got["x"], 2 * want_T + 1, rtol=1e-6)
  batch = next(pipeline.Pipeline(source, batch_size=16, seed=0))
  np.testing.assert_allclose(batch["x"], 2 * batch["x_T"] + 1, rtol=1e-6)
  # a second call recomputes nothing; other settings in the same folder are an error
  pairs.generate(sample_fn, noise, directory=directory, num_pairs=150, chunk_size=64,
                 progress=False)
  assert calls == [64, 64]
  with pytest.raises(ValueError, match="holds pairs made with"):
    pairs.generate(sample_fn, noise, directory=directory, num_pairs=200, chunk_size=64)
