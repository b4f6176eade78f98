"""Learned sampling: grids and coefficients fitted to the teacher against the best standard solvers.

COMMAND (from the repository root):
  python -m experiments.learned_sampling.main --config=experiments/learned_sampling/config.py:gmm64 --workdir=runs/learned_sampling
  python -m experiments.learned_sampling.main --config=experiments/learned_sampling/config.py:quick --workdir=runs/ls_quick

Expected runtime on 2 CPU cores: gmm64 ~20 min (28 fits of ~30 s: grid and coefficients at 7 NFE
on 2 teachers), quick ~4 min, tiny (the smoke test) ~1 min. No network, no trained network.

  python -m experiments.learned_sampling.main --config=experiments/learned_sampling/config.py:digits --workdir=runs/ls_digits

Expected runtime of digits: a few minutes (needs the trained teacher in runs/teacher_digits:
`python -m experiments.train_teacher.main --config=experiments/train_teacher/config.py:digits_cpu
--workdir=runs/teacher_digits`, ~15 min; the error message names it when it is missing).

Variants (the argument after ':'):
  gmm64   mixture64 (seed 0) and an unseen mixture64(seed=1), VP-linear, NFE 4..20.
  quick   the same at NFE 5 and 10.
  ring2d  8 Gaussians on a circle (2-D), NFE 4..20.
  digits  the trained 8x8 digits U-Net (its own EDM schedule), NFE 5 and 10, 128 / 256 draws.
  tiny    ring2d, NFE 5, few draws and iterations.

Every variant also runs the ancestral sampler (DDPM, eta = 1) with Analytic-DPM's variances and
the two fixed ones at each NFE of `nfe` (scored as distributions; see main.py).
"""

import ml_collections


def get_config(arg: str = "gmm64") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Each teacher is "name" or "name:seed" of analytic.MIXTURES, or "workdir:PATH" (a
  # train_teacher run folder); the fit sees only its denoiser.
  c.teachers = ("mixture64", "mixture64:1")
  c.schedule = "vp_linear"  # of the analytic teachers (a trained teacher brings its own)
  c.nfe = (4, 5, 6, 8, 10, 15, 20)
  c.match_nfe = (25, 30, 40)  # extra standard budgets for "which NFE matches learned at 10"
  c.solvers = ("unipc_2", "unipc_3", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "ipndm", "deis_3")
  c.spacings = ("logsnr", "karras", "time_quadratic")
  c.learned_solver = "unipc_2"  # the traceable solver whose grid / coefficients are fitted
  c.learn_coefficients = True
  c.num_calibration = 256
  c.num_test = 1024
  c.iterations = 150
  c.learning_rate = 0.05
  c.coefficient_learning_rate = 0.02
  c.reference_tol = 1e-6
  # Ancestral sampling (analytic_dpm.sample, eta = 1) at each NFE of `nfe`: its time grid; Gamma
  # comes from num_calibration data samples.
  c.ancestral_spacing = "logsnr"
  c.seed = 0
  if arg == "gmm64":
    pass
  elif arg == "quick":
    c.nfe = (5, 10)
    c.match_nfe = (15, 20, 25, 30)
  elif arg == "ring2d":
    c.teachers = ("ring2d", "grid2d")
  elif arg == "digits":
    c.teachers = ("workdir:runs/teacher_digits",)
    c.nfe = (5, 10)
    c.match_nfe = (15, 20)
    c.solvers = ("unipc_2", "dpm_solver_pp_2m", "ipndm")
    c.learn_coefficients = False
    c.num_calibration = 128
    c.num_test = 256
    c.iterations = 20
    c.reference_tol = 1e-5
  elif arg == "tiny":
    c.teachers = ("ring2d",)
    c.nfe = (5,)
    c.match_nfe = (8,)
    c.solvers = ("dpm_solver_pp_2m",)
    c.spacings = ("logsnr",)
    c.learned_solver = "dpm_solver_pp_2m"
    c.num_calibration = 32
    c.num_test = 64
    c.iterations = 5
    c.reference_tol = 1e-5
  else:
    raise ValueError(f"Unknown learned_sampling config {arg!r}; expected 'gmm64', 'quick', "
                     "'ring2d', 'digits' or 'tiny'.")
  return c
