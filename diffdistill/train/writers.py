"""Metric writers: JSON lines (`metrics.jsonl`) and TensorBoard scalars, on process 0 only.

`metrics.jsonl` holds one JSON object per logged step, with at least "step" and "loss".
TensorBoard event files (in `workdir/tensorboard`) are written with `tensorboardX`, which needs
protobuf but not TensorFlow; without it installed, a warning is logged and only the JSON lines
are written.

On resume from step s, `truncate_after(s)` drops the lines of steps > s that a killed run wrote
after its last checkpoint (and any half-written last line), so the file reads as one run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"
MAX_VECTOR = 16


def _scalar(value) -> float | int | str:
  v = np.asarray(value).reshape(()).item()
  if isinstance(v, float) and not math.isfinite(v):
    return repr(v)  # JSON has no NaN/inf; "nan"/"inf" stay readable
  return v


class MetricsWriter:
  """Writes scalar metrics of a step to JSON lines and TensorBoard (process 0 only).

  Args:
    workdir: the run's folder.
    enabled: False on every process but 0 (then every method does nothing).
    tensorboard: also write TensorBoard scalars (if tensorboardX is installed).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb_dir = os.path.join(workdir, "tensorboard")
    self._want_tb = tensorboard
    self._file = None
    self._tb = None

  def _open(self):
    if self._file is None:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      self._file = open(self.path, "a")
      if self._want_tb:
        try:  # imported here: tensorboardX imports torch when installed (seconds)
          import tensorboardX
        except ImportError:
          logging.warning("tensorboardX is not installed; writing %s only.", self.path)
        else:
          self._tb = tensorboardX.SummaryWriter(self._tb_dir)

  def truncate_after(self, step: int) -> None:
    """Keeps only the complete lines with "step" <= `step`."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if record.get("step", math.inf) <= step:
          kept.append(json.dumps(record) + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, object]) -> None:
    """One line {"step": step, name: value, ...}; a vector metric of at most MAX_VECTOR entries
    (e.g. the loss per logSNR bin) becomes name/0, name/1, ...; larger arrays are left out."""
    if not self.enabled:
      return
    self._open()
    record = {"step": int(step)}
    for name, value in metrics.items():
      arr = np.asarray(value)
      if arr.size == 1:
        record[name] = _scalar(arr)
      elif arr.ndim == 1 and arr.size <= MAX_VECTOR:
        record.update({f"{name}/{i}": _scalar(v) for i, v in enumerate(arr)})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, v in record.items():
        if name != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(name, v, global_step=int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
