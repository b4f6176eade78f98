"""Quickstart: every deterministic solver on an exact teacher, scored against the exact flow map.

COMMAND (from the repository root):
  python -m experiments.quickstart.main                      # ring2d, VP-linear: ~2 min on 2 CPU cores
  python -m experiments.quickstart.main --config=experiments/quickstart/config.py:mixture64
  python -m experiments.quickstart.main --workdir=runs/quickstart --config.nfe=5,10,20,50

Variants (the argument after ':'):
  ring2d     (default) 8 Gaussians on a circle in 2-D under VP-linear; the figure shows samples.
  mixture64  16 rotated anisotropic Gaussians in 64-D under VP-linear (analytic.mixture64).
  tiny       two solvers at NFE 5/10 on 64 ring samples: the smoke test's size (a few seconds).
"""

import ml_collections


def get_config(arg: str = "ring2d") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.teacher = "ring2d"  # an analytic.MIXTURES name
  c.schedule = "vp_linear"  # a schedules.SCHEDULES name, with its defaults
  c.spacing = "logsnr"  # the solvers' time grid
  c.nfe = (1, 2, 4, 5, 10, 20)
  c.solvers = ()  # empty: every deterministic solver of solvers.SOLVERS
  c.batch = 4096
  c.repeats = 5  # timed calls per (method, NFE); the median is reported
  c.seed = 0
  c.ref_tol = 1e-8  # rtol = atol of the float64 reference analytic.flow_map
  c.scatter_nfe = 4  # the NFE of the sample panels (2-D teachers only)
  c.scatter_methods = ("ddim", "dpm_solver_pp_2m", "unipc_3", "pd student")
  c.learned = ("unipc_2",)  # solvers also run on a grid fitted to the teacher
  c.distill = "pd_ring2d,quick"  # an experiments/distill variant whose students join the table
  if arg == "ring2d":
    pass
  elif arg == "mixture64":
    c.teacher = "mixture64"
    c.batch = 1024
    c.distill = "pd_gmm64,quick"
  elif arg == "tiny":
    c.batch = 64
    c.nfe = (5, 10)
    c.solvers = ("ddim", "dpm_solver_pp_2m")
    c.scatter_methods = ("ddim", "dpm_solver_pp_2m")
    c.learned = ()
    c.distill = "pd_ring2d,tiny"
    c.repeats = 2
    c.ref_tol = 1e-7
  else:
    raise ValueError(f"Unknown quickstart config {arg!r}; expected 'ring2d', 'mixture64' or 'tiny'.")
  return c
