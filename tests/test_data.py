"""Tests of diffdistill.data: builders (generated small in tmp dirs), the pipeline, no TensorFlow.

Independent references: the analytic mixtures (MMD to `analytic.sample`), scikit-learn's digits
array, the closed-form moons/spirals curves, and PNG bytes written here for the real-dataset path.
"""

import concurrent.futures
import io
import json
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffdistill import analytic
from diffdistill import data
from diffdistill import metrics
from diffdistill.data import digits8
from diffdistill.data import pipeline as pipeline_lib
from diffdistill.data import sources
from diffdistill.data import toy2d

N_RING = 2000  # Small generated versions keep the file well under 30 s.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def ring(data_dir):
  """Read from the array_record files batch by batch (the path of splits too big for memory)."""
  return sources.load("toy2d/ring", split="train", data_dir=data_dir, num_examples=N_RING, in_memory=False)


def _pipe(source, **kw):
  kw = {"batch_size": 48, "seed": 0, "prefetch": 0} | kw
  return pipeline_lib.Pipeline(source, **kw)


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_format(ring):
  ds = _pipe(ring, batch_size=16)
  batch = next(ds)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == ds.element_spec
  assert ring.num_classes == 8
  assert batch["x"].dtype == np.float32 and batch["x"].shape == (16, 2)
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (16,)
  assert batch["index"].dtype == np.int64 and batch["index"].shape == (16,)
  assert len(ring) == N_RING


def test_in_memory_source_gives_the_same_batches(ring):
  assert ring.arrays is None and ring.in_memory().arrays["x"].shape == (N_RING, 2)
  _assert_batches_equal(_take(_pipe(ring.in_memory()), 45), _take(_pipe(ring), 45))


def test_same_seed_same_batches_and_other_seed_differs(ring):
  a = _take(_pipe(ring, seed=3), 4)
  b = _take(_pipe(ring, seed=3, prefetch=2), 4)
  _assert_batches_equal(a, b)
  c = _take(_pipe(ring, seed=4), 4)
  assert not np.array_equal(a[0]["index"], c[0]["index"])


def test_each_epoch_is_a_permutation_and_rows_match_their_index(ring):
  # 48 does not divide 2000: batches run across epoch ends, the stream stays epoch-exact.
  batches = _take(_pipe(ring), (3 * N_RING) // 48 + 1)
  stream = np.concatenate([b["index"] for b in batches])
  epochs = [stream[e * N_RING:(e + 1) * N_RING] for e in range(3)]
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(N_RING))
  assert not np.array_equal(epochs[0], epochs[1])  # A fresh shuffle per epoch.
  for b in batches[:3] + batches[-2:]:
    np.testing.assert_array_equal(b["x"], ring.read(b["index"])["x"])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_equals_uninterrupted(ring, prefetch):
  uninterrupted = _take(_pipe(ring, prefetch=prefetch, batch_size=96), 30)
  first = _pipe(ring, prefetch=prefetch, batch_size=96)
  _take(first, 21)  # Into the second epoch (21 * 96 > 2000).
  state = json.loads(json.dumps(first.get_state()))
  assert state["step"] == 21
  first.close()
  resumed = _pipe(ring, prefetch=prefetch, batch_size=96)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 9), uninterrupted[21:])
  resumed.set_state({"step": 2})  # Also backwards, in the same iterator.
  _assert_batches_equal(_take(resumed, 3), uninterrupted[2:5])


def test_process_shards_are_disjoint_and_make_the_global_batch(ring):
  single = _take(_pipe(ring), 45)
  shards = [_take(_pipe(ring, process_index=i, process_count=4), 45) for i in range(4)]
  for step, glob in enumerate(single):
    parts = [s[step] for s in shards]
    for p in parts:
      assert p["x"].shape == (12, 2)
    idx = [p["index"] for p in parts]
    straddles = step * 48 < N_RING < (step + 1) * 48  # May hold an example twice.
    assert len(set(np.concatenate(idx).tolist())) == 48 or straddles
    for key in glob:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), glob[key])
  # The state is the global position: process 1 of 4 resumes from a single-process state.
  solo = _pipe(ring)
  _take(solo, 7)
  shard = _pipe(ring, process_index=1, process_count=4)
  shard.set_state(solo.get_state())
  np.testing.assert_array_equal(next(shard)["index"], single[7]["index"][12:24])


def test_ring_samples_match_the_analytic_mixture(ring):
  x = ring.read(np.arange(N_RING))["x"]
  exact = analytic.sample(analytic.ring2d(), jax.random.key(0), N_RING)
  other = analytic.sample(analytic.grid2d(), jax.random.key(1), N_RING)
  # Two exact sample sets of 2000 give |MMD^2| < 1.5e-3 (seeds 0-4); the ring against the grid, 0.045.
  assert abs(float(metrics.mmd2(x, exact))) < 3e-3 < 0.03 < float(metrics.mmd2(x, other))
  # Each component's share, mean and std (0.1) within ~4 standard errors.
  labels = ring.read(np.arange(N_RING))["label"]
  means = np.asarray(analytic.ring2d().means)
  for k in range(8):
    xk = x[labels == k]
    assert abs(len(xk) / N_RING - 1 / 8) < 0.03
    np.testing.assert_allclose(xk.mean(0), means[k], atol=0.03)
    np.testing.assert_allclose(xk.std(0), 0.1, atol=0.02)


def test_moons_and_spirals_lie_on_their_curves():
  cfg = toy2d.make_config("moons", num_train=4000, num_test=10)
  x, label = toy2d.sample(cfg, "train")
  centre = np.where(label[:, None] == 0, [0.0, 0.0], [1.0, 0.5]) + np.array([-0.5, -0.25])
  r = np.linalg.norm(x - centre, axis=1)  # Distance to the moon's circle centre: 1 + noise.
  assert abs(np.mean(r) - 1.0) < 0.02 and abs(np.std(r) - cfg.noise) < 0.02
  upper = (x - centre)[:, 1] * np.where(label == 0, 1.0, -1.0)  # sin u >= 0 outer, -sin u <= 0 inner.
  assert np.mean(upper > -3 * cfg.noise) > 0.99
  cfg = toy2d.make_config("spirals", num_train=2000, num_test=10)
  x, label = toy2d.sample(cfg, "train")
  theta = np.linspace(0.0, 3 * np.pi, 3000)
  def distance_to_arm(arm):  # [n]: to the curve theta * 1.5 / (3 pi) (cos, sin)(theta + pi arm).
    curve = theta[:, None] * 1.5 / (3 * np.pi) * np.stack([np.cos(theta + np.pi * arm), np.sin(theta + np.pi * arm)], 1)
    return np.min(np.linalg.norm(x[:, None] - curve[None], axis=-1), axis=1)
  own = np.where(label == 0, distance_to_arm(0), distance_to_arm(1))
  other = np.where(label == 0, distance_to_arm(1), distance_to_arm(0))
  assert np.median(own) < cfg.noise < 0.2 < np.median(other)  # Arms 0.5 apart.
  assert 0.4 < np.mean(label) < 0.6


def test_generation_is_byte_deterministic(tmp_path):
  for d in ("a", "b"):
    sources.embedded_builder("gmm/mixture64", data_dir=str(tmp_path / d), num_examples=200)
  files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.array_record*"))
  assert len(files) == 2
  for f in files:
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
  x = sources.load("gmm/mixture64", split="train", data_dir=str(tmp_path / "a"), num_examples=200).read(range(200))
  assert x["x"].shape == (200, 64) and 0 <= x["label"].min() and x["label"].max() < 16


def test_concurrent_preparation_of_one_dataset(tmp_path):
  # As several training processes on one machine do; flock also excludes threads (one open() each).
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    futures = [pool.submit(sources.load, "toy2d/moons", split="test", data_dir=str(tmp_path), num_examples=3000)
               for _ in range(3)]
    sizes = [len(f.result()) for f in futures]
  assert sizes == [300] * 3


def test_digits8_count_range_and_values(data_dir):
  from sklearn import datasets
  train = sources.load("digits8", split="train", data_dir=data_dir)
  test = sources.load("digits8", split="test", data_dir=data_dir)
  assert len(train) + len(test) == 1797 and len(train) == digits8.NUM_TRAIN
  both = [s.read(np.arange(len(s))) for s in (train, test)]
  x = np.concatenate([b["x"] for b in both])  # [1797, 8, 8, 1]
  label = np.concatenate([b["label"] for b in both])
  assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32
  assert x.min() == -1.0 and x.max() == 1.0
  ref = datasets.load_digits()
  ours = np.concatenate([(x.reshape(1797, 64) + 1) * 8, label[:, None]], axis=1)
  theirs = np.concatenate([ref.data, ref.target[:, None]], axis=1)
  np.testing.assert_array_equal(ours[np.lexsort(ours.T)], theirs[np.lexsort(theirs.T)])


class _FakeMnist(tfds.image_classification.MNIST, skip_registration=True):
  """TFDS's own MNIST builder (name, version, features) with 40 made-up images instead of the download."""
  name = "mnist"

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(32), "test": self._generate_examples(8)}

  def _generate_examples(self, num_examples):
    from PIL import Image  # PNG bytes: TFDS's numpy-image encoder would need TensorFlow.
    for i, (image, label) in enumerate(fake_mnist_images(num_examples)):
      buf = io.BytesIO()
      Image.fromarray(image[..., 0]).save(buf, format="png")
      yield i, {"image": buf.getvalue(), "label": label}


def fake_mnist_images(n):
  rng = np.random.default_rng(n)
  return [(rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), int(rng.integers(10))) for _ in range(n)]


@pytest.mark.parametrize("in_memory", [None, False])
def test_real_dataset_code_path_on_self_made_mnist(tmp_path, in_memory):
  with pytest.raises(FileNotFoundError, match="download=False"):
    data.get_dataset("mnist", split="train", batch_size=8, seed=0, data_dir=str(tmp_path), download=False)
  _FakeMnist(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
  ds = data.get_dataset("mnist", split="train", batch_size=8, seed=0, data_dir=str(tmp_path), download=False,
                        in_memory=in_memory)
  assert (ds.source.arrays is None) == (in_memory is False)
  batches = _take(ds, 4)  # One epoch of 32.
  x = np.concatenate([b["x"] for b in batches])
  label = np.concatenate([b["label"] for b in batches])
  assert x.shape == (32, 28, 28, 1) and x.dtype == np.float32 and label.dtype == np.int32
  assert ds.element_spec["x"] == ((8, 28, 28, 1), np.float32) and ds.source.num_classes == 10
  np.testing.assert_array_equal(np.sort(np.concatenate([b["index"] for b in batches])), np.arange(32))
  expected = {(img.astype(np.float32) / 127.5 - 1).tobytes(): lab for img, lab in fake_mnist_images(32)}
  for xi, li in zip(x, label):
    assert expected[xi.tobytes()] == li  # Every image decoded exactly, scaled to [-1, 1], with its label.
  # Any other TFDS builder, by 'tfds:NAME', takes the same path.
  other = data.get_dataset("tfds:mnist", split="train", batch_size=8, seed=0, data_dir=str(tmp_path), download=False)
  _assert_batches_equal(_take(other, 4), batches)


class _NumpyImageMnist(_FakeMnist, skip_registration=True):
  """Yields NumPy images, as TFDS's real generators do; TFDS PNG-encodes those with TensorFlow."""

  def _generate_examples(self, num_examples):
    yield from enumerate({"image": img, "label": lab} for img, lab in fake_mnist_images(num_examples))


def test_preparing_with_numpy_images_says_tensorflow_is_needed(tmp_path):
  with pytest.raises(RuntimeError, match="needs TensorFlow; reading does not"):
    sources.prepare_builder(_NumpyImageMnist(data_dir=str(tmp_path)))


def test_no_tensorflow(ring):
  next(_pipe(ring, prefetch=2))
  assert "tensorflow" not in sys.modules
  with pytest.raises(ImportError):
    import tensorflow  # noqa: F401


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "cifar100"}, "toy2d/ring.*digits8.*cifar10"),
    ({"batch_size": 10, "process_count": 4}, "not divisible by process_count"),
    ({"batch_size": 0}, "batch_size"),
    ({"seed": -1}, "seed"),
    ({"process_index": 2, "process_count": 2}, "process_index"),
    ({"split": "validation"}, "split"),
    ({"name": "digits8", "num_examples": 10}, "num_examples"),
])
def test_bad_input(data_dir, kwargs, match):
  kw = {"name": "toy2d/ring", "split": "train", "batch_size": 8, "seed": 0, "data_dir": data_dir,
        "num_examples": N_RING} | kwargs
  with pytest.raises(ValueError, match=match):
    data.get_dataset(**kw)


def test_set_state_rejects_another_pipelines_state(ring):
  with pytest.raises(ValueError, match="seed"):
    _pipe(ring, seed=1).set_state(_pipe(ring, seed=2).get_state())
  with pytest.raises(ValueError, match="step"):
    _pipe(ring).set_state({"steps": 3})


@pytest.mark.slow
def test_full_size_embedded_datasets(tmp_path):
  """The default sizes (about 30 s to generate on 2 cores)."""
  for name in sources.EMBEDDED_NAMES:
    sizes = {split: len(sources.load(name, split=split, data_dir=str(tmp_path), in_memory=False))
             for split in ("train", "test")}
    assert sizes == ({"train": 1500, "test": 297} if name == "digits8" else {"train": 100_000, "test": 10_000})
  x = sources.load("gmm/mixture64", split="test", data_dir=str(tmp_path)).read(np.arange(10_000))["x"]
  exact = analytic.sample(analytic.mixture64(), jax.random.key(0), 10_000)
  assert abs(float(metrics.mmd2(x, exact))) < 1e-3  # Floor of two exact sets: 3e-5; another mixture64: 0.18.


def test_data_dir_from_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("DIFFDISTILL_DATA_DIR", str(tmp_path))
  data.get_dataset("toy2d/grid", split="test", batch_size=4, seed=0, num_examples=40)
  assert (tmp_path / "toy2d" / "grid-n40-4" / "1.0.0" / "dataset_info.json").exists()


# ---- Bad inputs (issue 7). ----


def test_tfds_slices_are_splits(data_dir):
  ds = data.get_dataset("toy2d/ring", split="train[:100]", batch_size=10, seed=0, data_dir=data_dir,
                        num_examples=N_RING, prefetch=0)
  full = sources.load("toy2d/ring", split="train", data_dir=data_dir, num_examples=N_RING)
  assert ds.num_examples == 100
  idx = np.concatenate([next(ds)["index"] for _ in range(10)])  # one epoch
  assert sorted(idx.tolist()) == list(range(100))
  batch = ds.batch(0)
  np.testing.assert_array_equal(batch["x"], full.read(batch["index"])["x"])
  ds.close()


@pytest.mark.parametrize("split, message", [
    ("trian", r"'toy2d/ring' has splits \['test', 'train'\], or TFDS slices"),
    ("train[5:3]", "selects no examples"),
])
def test_bad_splits_name_the_accepted_ones(data_dir, split, message):
  with pytest.raises(ValueError, match=message):
    sources.load("toy2d/ring", split=split, data_dir=data_dir, num_examples=N_RING)


def test_pipeline_sizes_take_numpy_ints_and_reject_bools(ring):
  assert _pipe(ring, batch_size=np.int64(8), seed=np.int32(1)).batch(0)["x"].shape == (8, 2)
  with pytest.raises(ValueError, match="batch_size must be an integer, got True"):
    _pipe(ring, batch_size=True)
