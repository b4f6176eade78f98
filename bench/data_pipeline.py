"""Input-pipeline throughput: examples per second of `data.get_dataset`, with and without prefetch,
native and on grain (0, 1 and 2 worker processes).

    PYTHONPATH=. python bench/data_pipeline.py --data_dir=/tmp/tfds_bench

For each dataset, storage (decoded into memory once, or read from the array_record files batch by
batch) and prefetch depth it times `--num_batches` batches after `--warmup` batches:
  read-only      next(ds) back to back (the pipeline's own speed);
  with a step    next(ds) then a stand-in train step of `--step_ms` ms (time.sleep, which releases
                 the GIL as an XLA computation does); the input overhead is the time above that of
                 the same loop of sleeps alone, i.e. what the background thread does not hide.
"setup" is the time get_dataset takes (the split already generated; in memory: decoding it).
Writes bench/data_pipeline.json and bench/data_pipeline.md.
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app
from absl import flags

from diffdistill import data

_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/tfds_bench", "TFDS data_dir (embedded sets are generated there).")
_DATASETS = flags.DEFINE_list("datasets", ["toy2d/ring", "gmm/mixture64", "digits8"], "Datasets.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_NUM = flags.DEFINE_integer("num_batches", 100, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches first.")
_STEP_MS = flags.DEFINE_float("step_ms", 10.0, "Stand-in train step, ms.")
_WORKERS = flags.DEFINE_list("grain_workers", ["0", "1", "2"], "grain worker processes to time.")
_OUT = flags.DEFINE_string("out", os.path.dirname(os.path.abspath(__file__)), "Output folder.")


def _time(ds, step_s: float) -> float:
  for _ in range(_WARMUP.value):
    next(ds)
  start = time.perf_counter()
  for _ in range(_NUM.value):
    next(ds)
    if step_s:
      time.sleep(step_s)
  return time.perf_counter() - start


def _sleeps_ms(step_s: float) -> float:
  start = time.perf_counter()
  for _ in range(_NUM.value):
    time.sleep(step_s)
  return 1e3 * (time.perf_counter() - start) / _NUM.value


def main(argv):
  del argv
  for name in _DATASETS.value:  # Generate first, so that setup times only loading.
    data.load(name, split="train", data_dir=_DATA_DIR.value, in_memory=False)
  rows = []
  # (pipeline, prefetch, workers): native without and with its prefetch thread; grain with its
  # read-ahead thread (prefetch 2) and 0 / 1 / 2 worker processes
  variants = [("native", 0, 0), ("native", 2, 0)] + [("grain", 2, int(w)) for w in _WORKERS.value]
  for name in _DATASETS.value:
    for in_memory in (True, False):
      for pipeline, prefetch, workers in variants:
        for step_ms in (0.0, _STEP_MS.value):
          start = time.perf_counter()
          with data.get_dataset(name, split="train", batch_size=_BATCH.value, seed=0, data_dir=_DATA_DIR.value,
                                prefetch=prefetch, in_memory=in_memory, pipeline=pipeline,
                                workers=workers) as ds:
            setup_s = time.perf_counter() - start
            seconds = _time(ds, step_ms / 1e3)
          per_batch_ms = 1e3 * seconds / _NUM.value
          rows.append({"dataset": name, "in_memory": in_memory, "pipeline": pipeline,
                       "workers": workers, "prefetch": prefetch, "step_ms": step_ms,
                       "setup_s": setup_s, "ms_per_batch": per_batch_ms,
                       "examples_per_s": _BATCH.value * _NUM.value / seconds,
                       "input_overhead_ms": per_batch_ms - (_sleeps_ms(step_ms / 1e3) if step_ms else 0.0)})
          print(rows[-1])
  meta = {"batch_size": _BATCH.value, "num_batches": _NUM.value, "cpu_count": os.cpu_count(),
          "machine": platform.processor() or platform.machine()}
  with open(os.path.join(_OUT.value, "data_pipeline.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  lines = [f"Batch {_BATCH.value}, {_NUM.value} timed batches, {os.cpu_count()} CPU cores "
           "(`PYTHONPATH=. python bench/data_pipeline.py`).", "",
           "| dataset | storage | pipeline | prefetch | workers | setup (s) | step (ms) | ms / batch | examples / s | input overhead (ms / batch) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  lines += [f"| {r['dataset']} | {'memory' if r['in_memory'] else 'files'} | {r['pipeline']} | {r['prefetch']} | "
            f"{r['workers']} | {r['setup_s']:.2f} | "
            f"{r['step_ms']:.0f} | {r['ms_per_batch']:.2f} | {r['examples_per_s']:,.0f} | {r['input_overhead_ms']:.2f} |"
            for r in rows]
  with open(os.path.join(_OUT.value, "data_pipeline.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
