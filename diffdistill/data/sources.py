"""Dataset names -> random-access sources over TFDS array_record files, with no TensorFlow.

Every dataset, embedded or real, is a TFDS builder whose splits are written as array_record files
and read back with `builder.as_data_source(split)`: a random-access sequence whose records TFDS
decodes with NumPy (and PIL for encoded images). Nothing here imports TensorFlow.

Names:
  embedded (generated locally, no download): `EMBEDDED_NAMES`, e.g. 'toy2d/ring', 'gmm/mixture64',
    'digits8';
  real TFDS datasets: `REAL_NAMES` ('cifar10', 'mnist', 'imagenet_resized/64x64'), and any other
    TFDS builder as 'tfds:NAME[/CONFIG]'. They are prepared with
    `download_and_prepare(file_format='array_record')` when missing. The stock TFDS generators of
    these datasets call TensorFlow (`tf.io.gfile`, `tf.image.encode_png`), so preparing them needs
    TensorFlow once, on any machine (`tfds build cifar10 --file_format=array_record`); reading the
    prepared files never does.

A source's `read(indices)` returns {"x": float32 [n, ...], "label": int32 [n]} ("label" only where
the dataset has one); uint8 images are mapped to [-1, 1] by x = u / 127.5 - 1, NHWC.

Reading goes through TFDS's per-record NumPy decoder, about 30 us per example on one core. A split
that fits in `IN_MEMORY_MAX_BYTES` (all embedded sets, cifar10, mnist) is therefore decoded once
into arrays, stored as on disk (uint8 images stay uint8), and batches are gathered from those;
larger ones (imagenet_resized) are read batch by batch, each process reading only its own rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from diffdistill.data import _common
from diffdistill.data import digits8
from diffdistill.data import gmm
from diffdistill.data import toy2d

_EMBEDDED_BUILDERS = {
    "toy2d": (toy2d.Toy2d, toy2d.DISTRIBUTIONS),
    "gmm": (gmm.Gmm, gmm.MIXTURES),
    "digits8": (digits8.Digits8, ()),
}
EMBEDDED_NAMES = tuple(f"{b}/{c}" if c else b for b, (_, cs) in _EMBEDDED_BUILDERS.items() for c in cs or ("",))
REAL_NAMES = ("cifar10", "mnist", "imagenet_resized/64x64")
TFDS_PREFIX = "tfds:"
IN_MEMORY_MAX_BYTES = 1 << 30
_CHUNK = 4096  # Records per read while loading a split into memory.


@dataclasses.dataclass(frozen=True)
class Source:
  """One split of one dataset, read by index.

  Attributes:
    name: the dataset name it was loaded under.
    split: the TFDS split ('train', 'test', ...).
    records: the TFDS random-access data source (len, __getitems__).
    x_key: the feature that becomes "x" ("x" for embedded datasets, "image" for image datasets).
    label_key: the feature that becomes "label", or None.
    scale_uint8: map uint8 values u to u / 127.5 - 1.
    example_shape: the shape of one "x" (e.g. (2,), (8, 8, 1), (32, 32, 3)).
    num_classes: the number of labels, or None where there are none.
    arrays: the whole split as stored ({"x": [n, ...], "label": [n]}) once `in_memory()` loaded it.
    extra_keys: further float features read as they are, under their own names (teacher pairs'
      "x_T").
  """
  name: str
  split: str
  records: Any
  x_key: str
  label_key: str | None
  scale_uint8: bool
  example_shape: tuple[int, ...]
  num_classes: int | None
  arrays: dict[str, np.ndarray] | None = None
  extra_keys: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.records)

  @property
  def nbytes(self) -> int:
    """Bytes of the whole split as stored (its "x" and labels)."""
    itemsize = 1 if self.scale_uint8 else 4
    per_example = int(np.prod(self.example_shape)) * (itemsize + 4 * len(self.extra_keys))
    return len(self) * (per_example + (8 if self.label_key else 0))

  def _read_stored(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    if self.arrays is not None:
      return {k: v[np.asarray(indices, np.int64)] for k, v in self.arrays.items()}
    examples = self.records.__getitems__([int(i) for i in indices])
    out = {"x": np.stack([e[self.x_key] for e in examples])}  # [n, ...]
    if self.label_key is not None:
      out["label"] = np.asarray([e[self.label_key] for e in examples], np.int64)
    for key in self.extra_keys:
      out[key] = np.stack([e[key] for e in examples])
    return out

  def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The examples at `indices` (record numbers in the split), stacked: {"x": [n, ...], "label": [n]}."""
    stored = self._read_stored(indices)
    x = stored["x"].astype(np.float32)
    out = {"x": x / np.float32(127.5) - np.float32(1.0) if self.scale_uint8 else x}
    if self.label_key is not None:
      out["label"] = stored["label"].astype(np.int32)
    for key in self.extra_keys:
      out[key] = stored[key].astype(np.float32)
    return out

  def in_memory(self) -> "Source":
    """This split decoded once into arrays (same `read` results, no per-record decoding after)."""
    if self.arrays is not None:
      return self
    chunks = [self._read_stored(range(i, min(i + _CHUNK, len(self)))) for i in range(0, len(self), _CHUNK)]
    arrays = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    return dataclasses.replace(self, arrays=arrays)


def valid_names() -> tuple[str, ...]:
  return EMBEDDED_NAMES + REAL_NAMES


def _check_name(name: str) -> None:
  if name in EMBEDDED_NAMES or name in REAL_NAMES or (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX)):
    return
  raise ValueError(f"Unknown dataset name {name!r}; expected one of {list(valid_names())}, "
                   f"or '{TFDS_PREFIX}NAME' for any other TFDS builder.")


def embedded_builder(name: str, *, data_dir: str | None = None,
                     num_examples: int | None = None) -> tfds.core.DatasetBuilder:
  """The builder of an embedded dataset, prepared (generated into data_dir if not there yet).

  Args:
    name: one of `EMBEDDED_NAMES`.
    data_dir: root of the TFDS tree; default `_common.resolve_data_dir(None)`. Files go to
      `data_dir/<builder>/<config>/<version>/`.
    num_examples: toy2d and gmm only: generate this many training examples (and
      max(1, num_examples // 10) test examples) instead of the defaults, under their own config name.
  """
  if name not in EMBEDDED_NAMES:
    raise ValueError(f"Not an embedded dataset: {name!r}; expected one of {list(EMBEDDED_NAMES)}.")
  builder_name, _, config = name.partition("/")
  cls = _EMBEDDED_BUILDERS[builder_name][0]
  if num_examples is not None:
    if builder_name == "digits8":
      raise ValueError("num_examples: digits8 has a fixed size (1797 images); pass num_examples=None.")
    module = toy2d if builder_name == "toy2d" else gmm
    config = module.make_config(config, num_train=num_examples, num_test=max(1, num_examples // 10))
  data_dir = _common.resolve_data_dir(data_dir)
  with _common.preparation_lock(data_dir, name if num_examples is None else f"{name}-n{num_examples}"):
    builder = cls(config=config or None, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
  return builder


def tfds_builder(name: str, *, data_dir: str | None = None, download: bool = True) -> tfds.core.DatasetBuilder:
  """A real TFDS dataset's builder, prepared as array_record files (downloaded if `download`).

  Raises:
    FileNotFoundError: not prepared in data_dir and download=False.
    RuntimeError: preparing needs TensorFlow (the stock generators use it) and it is not installed.
    ValueError: the dataset was prepared in a format without random access (tfrecord).
  """
  data_dir = _common.resolve_data_dir(data_dir)
  with _common.preparation_lock(data_dir, name):
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      prepare_builder(builder, download=download)
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f"{name!r} under {builder.data_dir!r} is stored as {builder.info.file_format}, which has no random "
        f"access; convert it with `tfds convert_format --dataset_dir={builder.data_dir} "
        f"--out_file_format=array_record`.")
  return builder


def prepare_builder(builder: tfds.core.DatasetBuilder, *, download: bool = True) -> None:
  """`builder.download_and_prepare(file_format='array_record')`, with clear errors.

  Raises:
    FileNotFoundError: download=False.
    RuntimeError: TFDS's generator for it needs TensorFlow (e.g. to PNG-encode NumPy images).
  """
  name = builder.name if builder.builder_config is None else f"{builder.name}/{builder.builder_config.name}"
  if not download:
    raise FileNotFoundError(f"{name!r} is not prepared under {builder.data_dir!r} and download=False.")
  try:
    builder.download_and_prepare(file_format="array_record")
  except ModuleNotFoundError as e:  # TFDS re-raises it with the feature's name in front.
    if "No module named 'tensorflow'" not in str(e):
      raise
    raise RuntimeError(
        f"Preparing {name!r} runs TFDS's own generator, which needs TensorFlow; reading does not. "
        f"Prepare it once where TensorFlow is installed: `tfds build {name} --file_format=array_record "
        f"--data_dir=DATA_DIR`, then copy DATA_DIR/{name} here.") from e


def source_from_builder(name: str, builder: tfds.core.DatasetBuilder, split: str, *,
                        extra_keys: tuple[str, ...] = ()) -> Source:
  """The `Source` of a prepared builder's split ("x" or "image" as x, "label" if present, and the
  float features `extra_keys`)."""
  return dataclasses.replace(_source_from_builder(name, builder, split), extra_keys=extra_keys)


def _source_from_builder(name: str, builder: tfds.core.DatasetBuilder, split: str) -> Source:
  # TFDS parses split names and slices ('train[:10]', 'train[10%:20%]', 'test+train[:5]').
  accepted = (f"{name!r} has splits {sorted(builder.info.splits)}, or TFDS slices of them such "
              "as 'train[:1000]' or 'train[:10%]'")
  if not isinstance(split, str):
    raise ValueError(f"split must be a string: {accepted}; got {split!r}.")
  try:
    num_examples = builder.info.splits[split].num_examples
  except (ValueError, KeyError) as e:
    raise ValueError(f"split: {accepted}; got {split!r} ({e}).") from None
  if num_examples <= 0:
    raise ValueError(f"split: {split!r} of {name!r} selects no examples.")
  features = builder.info.features
  x_key = "x" if "x" in features else "image"
  if x_key not in features:
    raise ValueError(f"{name!r} has no 'x' or 'image' feature; its features are {sorted(features)}.")
  label_key = "label" if "label" in features else None
  return Source(name=name, split=split, records=builder.as_data_source(split=split), x_key=x_key,
                label_key=label_key, scale_uint8=np.dtype(features[x_key].np_dtype) == np.uint8,
                example_shape=tuple(features[x_key].shape),
                num_classes=getattr(features[label_key], "num_classes", None) if label_key else None)


def load(name: str, *, split: str, data_dir: str | None = None, download: bool = True,
         num_examples: int | None = None, in_memory: bool | None = None) -> Source:
  """The random-access `Source` of `split` of dataset `name` (see the module docstring for names).

  in_memory: decode the whole split into arrays first; None: when it fits in IN_MEMORY_MAX_BYTES.
  """
  _check_name(name)
  if name in EMBEDDED_NAMES:
    builder = embedded_builder(name, data_dir=data_dir, num_examples=num_examples)
  else:
    if num_examples is not None:
      raise ValueError(f"num_examples: only embedded toy2d/gmm datasets can be resized, not {name!r}.")
    builder = tfds_builder(name.removeprefix(TFDS_PREFIX), data_dir=data_dir, download=download)
  source = _source_from_builder(name, builder, split)
  if in_memory or (in_memory is None and source.nbytes <= IN_MEMORY_MAX_BYTES):
    return source.in_memory()
  return source
