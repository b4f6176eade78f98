"""Offline teacher pairs (x_T, x_0 = the teacher's ODE solution of x_T) as a TFDS dataset.

Knowledge distillation, reflow and DMD's regression loss train on the teacher's coupling. It is
generated once, in chunks, by any `sample_fn(x_T) -> x_0` (the teacher's jitted sampler):

    source = pairs.generate(sample_fn, noise_fn, directory=workdir + "/pairs", num_pairs=65536)
    data = Pipeline(source, batch_size=256, seed=0)        # {"x_T": [B, ...], "x": [B, ...]}

A class-conditional teacher's pairs carry labels: `label_fn(i) -> labels` (deterministic in i),
`sample_fn(x_T, labels)`, and a "label" feature (`num_classes` classes) beside "x" and "x_T".

Chunk i's starts come from `noise_fn(i) -> x_T` (deterministic in i) and the chunk is written as
`chunks/chunk_<i>.npz` through a temporary file and a rename, so a killed generation leaves only
whole chunks and a restart computes just the missing ones. When every chunk exists they are
written as the array_record files of a TFDS builder (`teacher_pairs`) in `directory/tfds`, read
back without TensorFlow like every other dataset of the library (`sources.Source`, with "x_T" an
extra feature next to "x").
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from diffdistill.data import sources as sources_lib

_CHUNK_FILE = "chunk_{:05d}.npz"


@dataclasses.dataclass
class PairsConfig(tfds.core.BuilderConfig):
  """The pairs' shape and the folder of their chunks."""
  chunks_dir: str = ""
  example_shape: tuple[int, ...] = ()
  num_pairs: int = 0
  num_classes: int = 0  # > 0: labelled pairs


class TeacherPairs(tfds.core.GeneratorBasedBuilder):
  """(x_T, x_0) pairs of a teacher's sampler, written from the chunks of `pairs.generate`."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS: list = []  # the one config is made by `generate` (shape, chunks folder)

  def _info(self) -> tfds.core.DatasetInfo:
    shape = tuple(self.builder_config.example_shape)
    features = {"x": tfds.features.Tensor(shape=shape, dtype=np.float32),
                "x_T": tfds.features.Tensor(shape=shape, dtype=np.float32)}
    if self.builder_config.num_classes:
      features["label"] = tfds.features.ClassLabel(num_classes=self.builder_config.num_classes)
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, disable_shuffling=True,  # record i is pair i
        features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    config = self.builder_config
    index = 0
    for name in sorted(os.listdir(config.chunks_dir)):
      with np.load(os.path.join(config.chunks_dir, name)) as chunk:
        labels = chunk["label"] if config.num_classes else [None] * len(chunk["x"])
        for x_T, x0, label in zip(chunk["x_T"], chunk["x"], labels):
          if index < config.num_pairs:
            example = {"x": x0.astype(np.float32), "x_T": x_T.astype(np.float32)}
            yield index, example if label is None else {**example, "label": int(label)}
          index += 1


def _write_chunk(path: str, x_T: np.ndarray, x0: np.ndarray, labels=None) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, x_T=x_T, x=x0, **({} if labels is None else {"label": labels}))
  os.replace(tmp, path)


def generate(sample_fn: Callable[..., np.ndarray], noise_fn: Callable[[int], np.ndarray],
             *, directory: str, num_pairs: int, chunk_size: int = 4096,
             progress: bool = True, label_fn: Callable[[int], np.ndarray] | None = None,
             num_classes: int = 0) -> sources_lib.Source:
  """Generates (or completes, after a kill) the pairs and returns their random-access source.

  Args:
    sample_fn: x_T [n, ...] -> x_0 [n, ...], the teacher's sampler (numpy in and out); with
      label_fn, (x_T, labels [n]) -> x_0.
    noise_fn: chunk index i -> x_T [chunk_size, ...], deterministic in i.
    label_fn: chunk index i -> labels [chunk_size] in [0, num_classes), deterministic in i: a
      class-conditional teacher's pairs (a "label" feature).
    num_classes: the labels' range (needed with label_fn).
    directory: where chunks/ and tfds/ go (created).
    num_pairs: total pairs (the last chunk is cut to it).
    chunk_size: pairs per chunk.
    progress: show a progress bar.
  Returns:
    the 'train' split as a `sources.Source` in memory: read() gives {"x": x_0, "x_T": x_T}
    (and "label").
  """
  if (label_fn is None) != (not num_classes):
    raise ValueError(f"label_fn and num_classes go together (labelled pairs): got label_fn="
                     f"{label_fn!r}, num_classes={num_classes!r}.")
  if isinstance(num_pairs, bool) or not isinstance(num_pairs, (int, np.integer)) or num_pairs < 1:
    raise ValueError(f"num_pairs must be an integer >= 1, got {num_pairs!r}.")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}.")
  chunks_dir = os.path.join(directory, "chunks")
  os.makedirs(chunks_dir, exist_ok=True)
  meta_path = os.path.join(directory, "pairs.json")
  meta = {"num_pairs": int(num_pairs), "chunk_size": int(chunk_size),
          **({"num_classes": int(num_classes)} if num_classes else {})}
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      old = json.load(f)
    if old != meta:
      raise ValueError(f"{directory} holds pairs made with {old}, not {meta}; use another "
                       "directory or remove it.")
  else:
    with open(meta_path, "w") as f:
      json.dump(meta, f)
  num_chunks = -(-num_pairs // chunk_size)
  todo = [i for i in range(num_chunks)
          if not os.path.exists(os.path.join(chunks_dir, _CHUNK_FILE.format(i)))]
  shape = None
  for i in tqdm.tqdm(todo, desc="teacher pairs (chunks)", disable=not progress or not todo):
    x_T = np.asarray(noise_fn(i), np.float32)
    if x_T.shape[0] != chunk_size:
      raise ValueError(f"noise_fn({i}) returned {x_T.shape[0]} rows, expected chunk_size="
                       f"{chunk_size}.")
    labels = None
    if label_fn is not None:
      labels = np.asarray(label_fn(i), np.int32)
      if labels.shape != (chunk_size,) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"label_fn({i}) must give {chunk_size} labels in [0, {num_classes}), got "
                         f"shape {labels.shape}, range [{labels.min()}, {labels.max()}].")
    x0 = np.asarray(sample_fn(x_T) if labels is None else sample_fn(x_T, labels), np.float32)
    if x0.shape != x_T.shape:
      raise ValueError(f"sample_fn returned shape {x0.shape} for x_T of shape {x_T.shape}.")
    _write_chunk(os.path.join(chunks_dir, _CHUNK_FILE.format(i)), x_T, x0, labels)
    shape = x_T.shape[1:]
  if shape is None:
    with np.load(os.path.join(chunks_dir, _CHUNK_FILE.format(0))) as chunk:
      shape = chunk["x_T"].shape[1:]
  config = PairsConfig(name="default", chunks_dir=chunks_dir, example_shape=tuple(shape),
                       num_pairs=int(num_pairs), num_classes=int(num_classes))
  builder = TeacherPairs(config=config, data_dir=os.path.join(directory, "tfds"))
  builder.download_and_prepare(file_format="array_record")
  return sources_lib.source_from_builder("teacher_pairs", builder, "train",
                                         extra_keys=("x_T",)).in_memory()


__all__ = ["generate", "TeacherPairs", "PairsConfig"]
