"""FID's cost on this machine: Inception-v3 throughput, end-to-end FID of N random images, and FID
from precomputed features.

    PYTHONPATH=. python bench/fid.py                      # ~5 min on 2 CPU cores
    PYTHONPATH=. python bench/fid.py --num_images=2000 --batch_size=100

Random Inception weights (the cost does not depend on their values) and random uint8 32x32
images. Rows: (1) the Inception forward (resize to 299 + network) on one batch, timed after a
warm-up: images/s; (2) FID end to end on --num_images images (`metrics.inception.inception_outputs`
-> `StreamingMoments` -> `frechet_distance_float64` against random reference statistics),
including compilation, with the 50k-image time extrapolated from the measured throughput
(labelled as such); (3) FID from --num_features precomputed 2048-D features streamed in batches
of 1000 (moments + the float64 matrix square root), measured, not extrapolated. Peak memory is the
process's peak RSS (`ru_maxrss`) after each row, so it is cumulative. Writes bench/fid.json and
bench/fid.md.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time

from absl import app, flags
import jax
import numpy as np

from diffdistill import metrics
from diffdistill.metrics import inception as inception_eval
from diffdistill.nets import inception as inception_net

_N = flags.DEFINE_integer("num_images", 200, "Images of the end-to-end FID.")
_BATCH = flags.DEFINE_integer("batch_size", 50, "Images per Inception batch.")
_FEATURES = flags.DEFINE_integer("num_features", 50_000, "Precomputed features of row (3).")
_OUT = flags.DEFINE_string("out", os.path.dirname(os.path.abspath(__file__)), "Output folder.")


def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  variables = inception_net.init_variables(jax.random.key(0))
  ref_mu, ref_sigma = rng.normal(size=2048), np.eye(2048)
  b = _BATCH.value
  rows = []

  batch = rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)
  jax.block_until_ready(inception_net.inception_features(variables, batch))  # compile
  times = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(inception_net.inception_features(variables, batch))
    times.append(time.perf_counter() - start)
  per_s = b / min(times)
  rows.append({"what": f"Inception forward, batch {b}, 32x32 -> 299", "images_per_s": per_s,
               "seconds": min(times), "peak_rss_mib": _peak_mib()})

  n = _N.value
  images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  start = time.perf_counter()
  moments = metrics.StreamingMoments()
  for pool3, _, mask in inception_eval.inception_outputs(variables, images, batch_size=b):
    moments.update(pool3, mask=mask)
  fid = metrics.frechet_distance_float64(*moments.statistics(), ref_mu, ref_sigma)
  seconds = time.perf_counter() - start
  rows.append({"what": f"FID end to end, {n} images (measured)", "seconds": seconds,
               "images_per_s": n / seconds, "fid": fid, "peak_rss_mib": _peak_mib()})
  rows.append({"what": "FID end to end, 50,000 images (extrapolated from row 1's throughput)",
               "seconds": 50_000 / per_s, "images_per_s": per_s, "peak_rss_mib": None})

  m = _FEATURES.value
  start = time.perf_counter()
  moments = metrics.StreamingMoments()
  for i in range(0, m, 1000):  # features arrive in batches, as they would from a file or network
    moments.update(jax.numpy.asarray(rng.normal(size=(min(1000, m - i), 2048)).astype(np.float32)))
  mid = time.perf_counter()
  fid = metrics.frechet_distance_float64(*moments.statistics(), ref_mu, ref_sigma)
  end = time.perf_counter()
  rows.append({"what": f"FID from {m} precomputed features (measured)", "seconds": end - start,
               "moments_seconds": mid - start, "sqrtm_seconds": end - mid, "fid": fid,
               "peak_rss_mib": _peak_mib()})

  meta = {"backend": jax.default_backend(), "devices": len(jax.devices()),
          "device": str(jax.devices()[0]), "machine": platform.machine(),
          "cpus": os.cpu_count(), "load_1min": os.getloadavg()[0], "jax": jax.__version__}
  with open(os.path.join(_OUT.value, "fid.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  lines = [f"# FID cost ({meta['backend']}, {meta['devices']} device(s), {meta['cpus']} CPUs, "
           f"1-min load {meta['load_1min']:.1f})", "",
           "| what | seconds | images/s | peak RSS MiB (cumulative) |", "|---|---:|---:|---:|"]
  for r in rows:
    ips = f"{r['images_per_s']:.1f}" if r.get("images_per_s") else ""
    rss = f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else "-"
    lines.append(f"| {r['what']} | {r['seconds']:.1f} | {ips} | {rss} |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(_OUT.value, "fid.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
