#!/usr/bin/env bash
# One device-machine run (H100/H200): FID's cost (bench/fid.py), the CIFAR-10 U-Net train step in
# float32 and bfloat16, the solvers-vs-peers benchmark on the GPU, and the DiT jvp / throughput
# rows of bench/jvp_cost.py. Expects the peers' and ml_collections' wheels in .whl/
# (see bench/README.md) and writes everything under $OUT. Each part has its own time limit, so one
# slow part cannot take the others' results with it.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 4
export PYTHONPATH=/tmp/site:$PWD
LOG=$OUT/log.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $LOG 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" >> $LOG 2>&1
# first, since it has no GPU numbers yet (issue 21): Inception throughput and a measured, not
# extrapolated, 50k-image FID end to end, then FID from 50k precomputed features
mkdir -p $OUT/fid
timeout 180 python3 bench/fid.py --num_images=50000 --batch_size=500 --out=$OUT/fid \
  >> $LOG 2>&1; echo "fid rc $?"
for dt in float32 bfloat16; do
  timeout 200 python3 bench/train_step.py --configs=cifar10_edm --batch=128 --iters=5 --dtype=$dt \
    --out=$OUT/train_step_$dt >> $LOG 2>&1; echo "train_step $dt rc $?"
done
timeout 200 python3 -m bench.solvers_vs_peers --repeats 5 --overhead-repeats 20 --out $OUT/peers \
  >> $LOG 2>&1; echo "peers rc $?"
# the jvp step against the DSM step of a DiT-B/2 at 256 tokens (issue: scale to pods), and the
# DiT-XL/2 forward and DSM step (fwd + bwd + Adam) at batch 64 in bfloat16 (real teachers)
mkdir -p $OUT/jvp_dit_B_2 $OUT/dit_XL_2
timeout 200 python3 bench/jvp_cost.py --nets=dit_B_2 --batch_size=64 --dtype=bfloat16 --repeats=5 \
  --out=$OUT/jvp_dit_B_2 >> $LOG 2>&1; echo "jvp dit_B_2 rc $?"
timeout 200 python3 bench/jvp_cost.py --nets=dit_XL_2 --batch_size=64 --dtype=bfloat16 --repeats=5 \
  --out=$OUT/dit_XL_2 >> $LOG 2>&1; echo "dit_XL_2 rc $?"
tail -60 $LOG
