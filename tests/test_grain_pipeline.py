"""The grain input pipeline (diffdistill/data/grain_pipeline.py): the native pipeline's contract
(epochs, process shards, exact resume from a JSON state) on grain's datasets, with and without
worker processes."""

import json

import numpy as np
import pytest

from diffdistill import data
from diffdistill.data import grain_pipeline

pytest.importorskip("grain")


@pytest.fixture(scope="module")
def digits():
  return data.load("digits8", split="train")


def _take(p, n):
  return [next(p) for _ in range(n)]


def test_every_epoch_is_a_permutation_and_the_seed_decides(digits):
  p = grain_pipeline.GrainPipeline(digits, batch_size=64, seed=3)
  batches = _take(p, 50)  # 3200 positions: two epochs of 1500 and a part of the third
  idx = np.concatenate([b["index"] for b in batches])
  for e in range(2):
    assert sorted(idx[1500 * e:1500 * (e + 1)].tolist()) == list(range(1500))
  assert not np.array_equal(idx[:1500], idx[1500:3000])  # a new order each epoch
  x_all, y_all = digits.read(np.arange(1500))["x"], digits.read(np.arange(1500))["label"]
  np.testing.assert_array_equal(batches[7]["x"], x_all[batches[7]["index"]])
  np.testing.assert_array_equal(batches[7]["label"], y_all[batches[7]["index"]])
  again = _take(grain_pipeline.GrainPipeline(digits, batch_size=64, seed=3), 5)
  other = _take(grain_pipeline.GrainPipeline(digits, batch_size=64, seed=4), 5)
  assert all(np.array_equal(a["index"], b["index"]) for a, b in zip(again, batches))
  assert not np.array_equal(other[0]["index"], batches[0]["index"])
  np.testing.assert_array_equal(p.batch(33)["index"], batches[33]["index"])  # random access


def test_resume_from_a_json_state_and_process_shards(digits):
  ref = _take(grain_pipeline.GrainPipeline(digits, batch_size=64, seed=0), 40)
  p = grain_pipeline.GrainPipeline(digits, batch_size=64, seed=0)
  _take(p, 17)
  state = json.loads(json.dumps(p.get_state()))  # what a checkpoint keeps
  p.close()
  q = data.get_dataset("digits8", split="train", batch_size=64, seed=0, pipeline="grain")
  q.set_state(state)
  assert all(np.array_equal(next(q)["x"], ref[i]["x"]) for i in range(17, 40))
  shards = [grain_pipeline.GrainPipeline(digits, batch_size=64, seed=0, process_index=i,
                                         process_count=2) for i in range(2)]
  for step in range(3):  # the processes' rows concatenate to the single-process batch
    np.testing.assert_array_equal(
        np.concatenate([next(s)["index"] for s in shards]), ref[step]["index"])


def test_state_of_the_other_pipeline_is_refused(digits):
  native = data.get_dataset("digits8", split="train", batch_size=64, seed=0)
  grain_p = data.get_dataset("digits8", split="train", batch_size=64, seed=0, pipeline="grain")
  with pytest.raises(ValueError, match="saved by the native pipeline"):
    grain_p.set_state(native.get_state())
  with pytest.raises(ValueError, match="saved by the grain pipeline"):
    native.set_state(grain_p.get_state())
  with pytest.raises(ValueError, match="another pipeline"):
    grain_p.set_state({**grain_p.get_state(), "seed": 1})
  with pytest.raises(ValueError, match="pipeline must be one of"):
    data.get_dataset("digits8", split="train", batch_size=64, seed=0, pipeline="tf.data")
  with pytest.raises(ValueError, match="workers=2 needs pipeline='grain'"):
    data.get_dataset("digits8", split="train", batch_size=64, seed=0, workers=2)


@pytest.mark.slow  # ~10 s: starting worker processes
def test_worker_processes_give_the_same_batches_and_resume(digits):
  ref = _take(grain_pipeline.GrainPipeline(digits, batch_size=64, seed=1), 30)
  with grain_pipeline.GrainPipeline(digits, batch_size=64, seed=1, workers=2) as p:
    assert all(np.array_equal(next(p)["x"], ref[i]["x"]) for i in range(20))
    state = p.get_state()
  with grain_pipeline.GrainPipeline(digits, batch_size=64, seed=1, workers=1) as q:
    q.set_state(state)  # another worker count
    assert all(np.array_equal(next(q)["x"], ref[i]["x"]) for i in range(20, 30))
