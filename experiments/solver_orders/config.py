"""Convergence table of every deterministic training-free solver on ground truth.

COMMAND (the `cpu` variant, about 20 minutes on 2 busy CPU cores, float64):
  python -m experiments.solver_orders.main --config=experiments/solver_orders/config.py:cpu \
      --workdir=/tmp/solver_orders

The `full` variant (4x the samples, a tighter reference; not yet run, expect about 45 minutes):
  python -m experiments.solver_orders.main --config=experiments/solver_orders/config.py:full \
      --workdir=/tmp/solver_orders_full

Data: analytic.mixture64() (16 rotated anisotropic Gaussians in 64-D). For each schedule the
noise x_T ~ N(0, (alpha^2 + sigma^2) I) at t_max is mapped to t_min by every deterministic
solver at each NFE and by analytic.flow_map (diffrax Dopri8, tight tolerance): the paired
error, the empirical order (slope of log RMS error against log NFE over nfe >= order_min_nfe)
and the sample quality against exact data samples.
"""

import ml_collections

from diffdistill import solvers

DETERMINISTIC = tuple(n for n, s in solvers.SOLVERS.items() if not s.stochastic and n != "adaptive")


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  if arg not in ("cpu", "full"):
    raise ValueError(f"Unknown variant {arg!r}; expected 'cpu' or 'full'.")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mixture = "mixture64"
  c.schedules = ("vp_linear", "vp_cosine", "edm", "rectified_flow")
  c.spacing = "logsnr"
  c.solvers = DETERMINISTIC
  c.nfes = (5, 6, 8, 10, 15, 20, 25, 50, 100)
  c.order_min_nfe = 25  # the small-step regime for the slope fit
  c.float64 = True
  c.num_samples = 256 if arg == "cpu" else 1024
  c.num_data = 1024 if arg == "cpu" else 4096  # exact data samples for the quality metrics
  c.ref_tol = 1e-9 if arg == "cpu" else 1e-11
  c.plot_solvers = ("ddim", "heun", "dpm_solver_2", "dpm_solver_3", "dpm_solver_pp_2m",
                    "dpm_solver_pp_3m", "unipc_2", "unipc_3", "deis_3", "ipndm", "lms")
  return c
