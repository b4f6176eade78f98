"""Distillation configs: `--config=experiments/distill/config.py:<method>_<testbed>`.

COMMAND (from the repository root):
  python -m experiments.distill.main --config=experiments/distill/config.py:pd_gmm64 --workdir=runs/pd_gmm64

Methods: pd (progressive distillation), kd (knowledge distillation), reflow (rectified flow),
diff_instruct, dmd, dmd2, sid (distribution matching into a one-step generator; section `dm`).
Testbeds:
  ring2d  the exact 8-mode ring teacher (analytic.ring2d) under VP-linear, MLP students.
  gmm64   the exact 16-component 64-D mixture (analytic.mixture64) under VP-linear, MLP students;
          `--config.teacher.mixture_file=PATH` swaps in any mixture file (weights, means, covs).
  digits  a trained digits teacher (`experiments/train_teacher` digits_cpu workdir, default
          runs/teacher_digits, `--config.teacher.path=...`), its U-Net as the student.
reflow variants use the exact teacher under rectified flow (the 1-rectified flow).
Every _gmm64 variant runs in under 10 minutes on 2 CPU cores (README.md has the measured times).
`tiny` shrinks any variant to a smoke test: `config.py:pd_ring2d,tiny`.
"""

import ml_collections

DM_METHODS = ("diff_instruct", "dmd", "dmd2", "sid")
METHODS = ("pd", "kd", "reflow") + DM_METHODS
TESTBEDS = ("ring2d", "gmm64", "digits")


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "pd"
  c.testbed = "gmm64"
  c.seed = 0
  c.batch_size = 512
  c.log_every = 100
  c.checkpoint_every = 500
  c.progress = True
  c.eval_ema = 0.995                 # decay of every student's "eval" EMA copy

  c.teacher = ml_collections.ConfigDict()
  c.teacher.kind = "analytic"        # analytic | file | workdir (experiments/teachers.py)
  c.teacher.name = "mixture64"
  c.teacher.mixture_file = ""        # a mixture .npz: sets kind 'file'
  c.teacher.path = ""                # a train_teacher workdir (kind 'workdir')
  c.teacher.dataset = ""             # the data of a trained teacher (its config's dataset)
  c.teacher.schedule = "vp_linear"
  c.teacher.schedule_kwargs = ml_collections.ConfigDict()

  c.student = ml_collections.ConfigDict()
  c.student.network = "mlp"
  c.student.kwargs = ml_collections.ConfigDict(dict(features=256, num_blocks=3, emb_dim=128))
  c.student.kind = "v"

  c.optim = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=5e-4, warmup_steps=100, schedule="cosine", end_factor=0.1,
      grad_clip=1.0))

  c.copy = ml_collections.ConfigDict(dict(num_steps=3000, weighting="truncated_snr",
                                          time_sampler="logsnr_uniform"))
  c.pd = ml_collections.ConfigDict(dict(teacher_steps=64, steps_per_round=1500, spacing="logsnr",
                                        weighting="truncated_snr", eval_steps=(8, 4, 2, 1)))
  c.kd = ml_collections.ConfigDict(dict(nfes=(1, 2, 4), num_steps=2000, spacing="logsnr",
                                        distance="l2"))
  c.reflow = ml_collections.ConfigDict(dict(num_steps=3000, nfes=(1, 2, 4), s_min=1e-5,
                                            pair_steps=64, kd_steps=2000, distance="l2",
                                            straightness_steps=128))
  c.pairs = ml_collections.ConfigDict(dict(num_pairs=32768, chunk_size=4096, solver="adaptive",
                                           nfe=0, tol=1e-5))

  c.eval = ml_collections.ConfigDict(dict(num_samples=4096, seed=1, repeats=3, ref_tol=1e-8))
  return c


def _testbed(c, testbed):
  c.testbed = testbed
  if testbed == "ring2d":
    c.teacher.name = "ring2d"
    c.student.kwargs.features = 128
  elif testbed == "digits":
    c.teacher.kind = "workdir"
    c.teacher.path = "runs/teacher_digits"
    c.teacher.dataset = "digits8"
    c.batch_size = 64
    c.copy.num_steps = 0
    c.pd.teacher_steps = 16
    c.pd.steps_per_round = 500
    c.pd.eval_steps = (8, 4)
    c.eval.num_samples = 256
    c.pairs.num_pairs = 4096
    c.pairs.chunk_size = 512
  elif testbed != "gmm64":
    raise ValueError(f"Unknown testbed {testbed!r}; expected one of {TESTBEDS}.")


def _method(c, method):
  c.method = method
  if method == "reflow":
    c.teacher.schedule = "rectified_flow"
    c.teacher.schedule_kwargs = ml_collections.ConfigDict(dict(t_min=1e-3, t_max=1.0))
    c.student.kind = "flow"
  elif method in DM_METHODS:
    _dm(c, method)
  elif method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")


def _dm(c, method):
  """Distribution matching: generator and fake score both start from the teacher copy."""
  c.dm = ml_collections.ConfigDict(dict(
      num_steps=2000, fake_repeats=5 if method == "dmd2" else 1, generator_lr=1e-4,
      fake_lr=2e-4, weighting="uniform", fake_weighting="uniform", time_sampler="uniform",
      regression_weight=0.25 if method == "dmd" else 0.0, sid_alpha=1.2,
      gan_weight=0.01 if method == "dmd2" else 0.0, schedule="constant",
      init_from_copy=True, sigma_init=2.5))
  if method == "dmd":  # the regression's pairs: 8192, by a 16-call DPM-Solver++(3M) (~1e-3 off)
    c.pairs.num_pairs = 8192
    c.pairs.solver, c.pairs.nfe = "dpm_solver_pp_3m", 16
  if method == "dmd2":  # k = 5 fake-score updates per step: fewer steps in the same time
    c.dm.num_steps = 1000


def _tiny(c):
  c.batch_size = 64
  c.log_every = 10
  c.checkpoint_every = 20
  c.progress = False
  c.student.kwargs = ml_collections.ConfigDict(dict(features=32, num_blocks=1, emb_dim=32))
  c.copy.num_steps = 40
  c.pd.teacher_steps = 4
  c.pd.steps_per_round = 20
  c.pd.eval_steps = (2, 1)
  c.kd.nfes = (1,)
  c.kd.num_steps = 20
  c.reflow.num_steps = 20
  c.reflow.kd_steps = 20
  c.reflow.nfes = (1,)
  c.reflow.pair_steps = 4
  c.reflow.straightness_steps = 8
  c.pairs.num_pairs = 128
  c.pairs.chunk_size = 64
  c.pairs.solver = "dpm_solver_pp_2m"
  c.pairs.nfe = 4
  c.eval.num_samples = 128
  c.eval.repeats = 1
  c.eval.ref_tol = 1e-6
  c.optim.warmup_steps = 0
  if "dm" in c:
    c.dm.num_steps = 20


def get_config(arg: str = "pd_gmm64") -> ml_collections.ConfigDict:
  variant, _, option = arg.partition(",")
  method, _, testbed = variant.rpartition("_")
  if not method:
    raise ValueError(f"config variant must be <method>_<testbed>[,tiny], e.g. pd_gmm64; got {arg!r}. "
                     f"Methods: {METHODS}; testbeds: {TESTBEDS}.")
  c = _base()
  _testbed(c, testbed)
  _method(c, method)
  if option == "tiny":
    _tiny(c)
  elif option:
    raise ValueError(f"Unknown config option {option!r}; the only option is 'tiny'.")
  return c
