"""Distillation configs: `--config=experiments/distill/config.py:<method>_<testbed>`.

COMMAND (from the repository root):
  python -m experiments.distill.main --config=experiments/distill/config.py:pd_gmm64 --workdir=runs/pd_gmm64

Methods: pd (progressive distillation), gpd (guided PD on a class-conditional split of the
mixture, recipes/guided.py), kd (knowledge distillation), reflow (rectified flow),
tract (transitive-closure time distillation), boot (data-free bootstrapping); consistency models
and flow maps (recipes/consistency.py): cd, ct, ict, ect, scd (on a TrigFlow teacher), meanflow
and shortcut (on a rectified-flow teacher); diff_instruct, dmd, dmd2, sid (distribution
matching into a one-step generator; section `dm`); ctm (consistency trajectory models,
ring2d and gmm64 only).
Testbeds:
  ring2d  the exact 8-mode ring teacher (analytic.ring2d) under VP-linear, MLP students.
  gmm64   the exact 16-component 64-D mixture (analytic.mixture64) under VP-linear, MLP students;
          `--config.teacher.mixture_file=PATH` swaps in any mixture file (weights, means, covs).
  digits  a trained digits teacher (`experiments/train_teacher` digits_cpu workdir, default
          runs/teacher_digits, `--config.teacher.path=...`), its U-Net as the student.
reflow variants use the exact teacher under rectified flow (the 1-rectified flow).
Every _gmm64 variant runs in under 10 minutes on 2 CPU cores (README.md has the measured times).
`tiny` shrinks any variant to a smoke test (`config.py:pd_ring2d,tiny`), `quick` to the
quickstart's budget (`config.py:pd_ring2d,quick`).
"""

import ml_collections

DM_METHODS = ("diff_instruct", "dmd", "dmd2", "sid", "sds", "vsd")
CM_METHODS = ("cd", "ct", "ict", "ect", "scd", "meanflow", "shortcut", "ctm")
METHODS = ("pd", "gpd", "kd", "reflow", "tract", "boot") + CM_METHODS + DM_METHODS
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

  # the network copy of an analytic teacher; `dir` shares one copy between variants of the same
  # teacher and student network (e.g. --config.copy.dir=runs/copy_gmm64): a copy of another
  # network is refused when its checkpoint is read; other settings are not checked (a larger
  # num_steps trains the shared copy on). learning_rate (0: optim's) is the copy's own: the copy
  # is fitted from scratch, while every later stage fine-tunes
  c.copy = ml_collections.ConfigDict(dict(num_steps=3000, weighting="truncated_snr",
                                          time_sampler="logsnr_uniform", dir="",
                                          learning_rate=0.0))
  c.pd = ml_collections.ConfigDict(dict(teacher_steps=64, steps_per_round=1500, spacing="logsnr",
                                        weighting="truncated_snr", eval_steps=(8, 4, 2, 1)))
  # guided PD (Meng et al. 2023) on the testbed's mixture split into classes (recipes/guided.py):
  # component k is in class k mod num_classes unless `classes` lists each component's class;
  # w in [w_min, w_max] (w = 1: the conditional teacher; Meng et al.'s w in [0, 4] is ours - 1)
  c.gpd = ml_collections.ConfigDict(dict(num_classes=4, classes=(), w_min=1.0, w_max=5.0,
                                         stage1_steps=3000, teacher_steps=32,
                                         steps_per_round=1000, spacing="logsnr",
                                         weighting="truncated_snr", time_sampler="logsnr_uniform",
                                         eval_steps=(8, 4, 2, 1), eval_w=(1.0, 3.0)))
  c.kd = ml_collections.ConfigDict(dict(nfes=(1, 2, 4), num_steps=2000, spacing="logsnr",
                                        distance="l2"))
  c.reflow = ml_collections.ConfigDict(dict(num_steps=3000, nfes=(1, 2, 4), s_min=1e-5,
                                            pair_steps=64, kd_steps=2000, distance="l2",
                                            straightness_steps=128))
  c.tract = ml_collections.ConfigDict(dict(teacher_steps=64, segments=(8, 1), steps_per_phase=3000,
                                           spacing="logsnr", weighting="truncated_snr",
                                           self_teacher_decay=0.99))
  c.boot = ml_collections.ConfigDict(dict(num_steps=6000, grid_steps=32, spacing="logsnr",
                                          step="heun", weighting="uniform"))
  _consistency_sections(c)
  c.pairs = ml_collections.ConfigDict(dict(num_pairs=32768, chunk_size=4096, solver="adaptive",
                                           nfe=0, tol=1e-5))

  c.eval = ml_collections.ConfigDict(dict(
      num_samples=4096, seed=1, repeats=3, ref_tol=1e-8,
      copy_rows=True,  # also score the network copy (the students' start) at each student NFE
      # the teacher's training-free solvers tried at each student NFE (the best is reported)
      solvers=("dpm_solver_pp_2m", "unipc_2", "unipc_3", "deis_3", "ipndm", "dpm_solver_pp_3m",
               "dpm_solver_2", "heun"),
      # reported at every NFE whether best or not (PD's table: DDIM and DPM-Solver++(2M))
      always=("dpm_solver_pp_2m",),
      teacher_nfes=()))  # more NFEs with teacher rows only (distribution matching: 10, 20, 50)
  return c


def _consistency_sections(c):
  """Consistency models and flow maps (recipes/consistency.py)."""
  c.consistency = ml_collections.ConfigDict(dict(nfes=(1, 2), spacing="karras", mid_sigma=0.8))
  c.cd = ml_collections.ConfigDict(dict(num_steps=4000, num_intervals=32, solver="heun", mu=0.95,
                                        distance="l2"))
  c.ct = ml_collections.ConfigDict(dict(num_steps=6000, s0=2, s1=150, mu0=0.9, distance="l2"))
  c.ict = ml_collections.ConfigDict(dict(num_steps=6000, s0=10, s1=1280, p_mean=-1.1, p_std=2.0))
  c.ect = ml_collections.ConfigDict(dict(num_steps=4000, stage_steps=1000, p_mean=-1.1,
                                         p_std=2.0, distance="l2"))
  c.scd = ml_collections.ConfigDict(dict(num_steps=4000, p_mean=-1.0, p_std=1.4,
                                         tangent_normalization=0.1, warmup_steps=1000,
                                         logvar_features=16, t_mid=1.1))
  c.meanflow = ml_collections.ConfigDict(dict(num_steps=5000, p_mean=-0.4, p_std=1.0,
                                              ratio_r_neq_t=0.25, adaptive_p=1.0,
                                              teacher_velocity=True, t_mid=0.5))
  # shortcut models: the paper's M = 128 base steps, 1/4 of the batch on self-consistency targets
  # from an EMA (0.999) copy; the flow-matching part regresses on the teacher's velocity
  c.shortcut = ml_collections.ConfigDict(dict(num_steps=5000, bootstrap_fraction=0.25,
                                              num_base_steps=128, ema=0.999,
                                              teacher_velocity=True))
  # CTM (Kim et al. 2024): max_solver_steps 0 = up to s; gamma of the sampler (0: deterministic)
  # gan_weight > 0 adds the GAN term (a linear head on the frozen copy's trunk), from gan_start
  c.ctm = ml_collections.ConfigDict(dict(num_steps=4000, num_intervals=32, solver="heun", mu=0.95,
                                         distance="l2", dsm_weight=1.0, max_solver_steps=0,
                                         gamma=0.0, gan_weight=0.0, gan_start=0))


def _testbed(c, testbed):
  c.testbed = testbed
  if testbed == "ring2d":
    c.teacher.name = "ring2d"
    c.student.kwargs.features = 128
  elif testbed == "digits":
    c.teacher.kind = "workdir"
    c.teacher.path = "runs/teacher_digits"
    c.teacher.dataset = "digits8"
    c.teacher.schedule = ""  # its own (EDM); a method that sets another reschedules the teacher
    # a student on another schedule than the teacher's cannot start from its weights: it is a
    # fresh U-Net of the teacher's architecture, fitted to the rescheduled teacher (the copy stage)
    c.student.network = "unet_digits8"  # digits_cpu's preset: match any other teacher's network
    c.student.kwargs = ml_collections.ConfigDict()
    c.batch_size = 64
    c.copy.num_steps = 0
    c.pd.teacher_steps = 16
    c.pd.steps_per_round = 500
    c.pd.eval_steps = (8, 4)
    c.eval.num_samples = 256
    c.eval.ref_tol = 1e-3  # the U-Net's own adaptive solve (float32): tighter costs many minutes
    c.pairs.num_pairs = 4096
    c.pairs.chunk_size = 512
  elif testbed == "gmm64":
    # the 64-D, 16-component denoiser is hard to fit: at the default 5e-4 the 3000-step copy sat
    # at x0 MSE 3.1e-3 and limited every student (README); 2e-3 halves it
    c.copy.learning_rate = 2e-3
    c.copy.num_steps = 4000
    c.pd.teacher_steps = 16
    c.tract.teacher_steps = 16
    c.tract.segments = (4, 1)
    c.tract.steps_per_phase = 1500
    c.boot.num_steps = 4000
  else:
    raise ValueError(f"Unknown testbed {testbed!r}; expected one of {TESTBEDS}.")


def _method(c, method):
  c.method = method
  if method == "reflow":
    if c.testbed == "digits":  # no budget for it: 4096 adaptive U-Net pairs alone take hours
      raise ValueError("reflow_digits is not a variant: reflow's adaptive pairs of the U-Net "
                       "teacher take hours on CPU; reflow runs on ring2d and gmm64.")
    c.teacher.schedule = "rectified_flow"
    c.teacher.schedule_kwargs = ml_collections.ConfigDict(dict(t_min=1e-3, t_max=1.0))
    c.student.kind = "flow"
    c.copy.time_sampler = "uniform"  # logSNR is -inf at the pure-noise end
  elif method == "scd":
    c.teacher.schedule = "trigflow"
    c.teacher.schedule_kwargs = ml_collections.ConfigDict(dict(sigma_data=0.5))
    c.student.kind = "flow"
    # the tangent differentiates the net in t: the default positional scale 1000 makes du/dt
    # (and ||g||) ~1e3 (Lu & Song 2025, Sec. 4.1: keep the time embedding's frequencies low)
    c.student.kwargs.embedding_scale = 10.0
  elif method in ("meanflow", "shortcut"):
    c.teacher.schedule = "rectified_flow"
    c.teacher.schedule_kwargs = ml_collections.ConfigDict(dict(t_min=1e-3, t_max=1.0))
    c.student.kind = "flow"
    c.copy.time_sampler = "uniform"  # logsnr(t_max = 1) = -inf: no logSNR-uniform draw
  if c.testbed == "digits" and c.teacher.schedule:  # rescheduled teacher: no weights to start from
    c.copy.num_steps = 1500
    c.copy.learning_rate = 1e-3
  if c.testbed == "digits" and method in CM_METHODS:
    # the U-Net costs ~0.3-1 s per step on 2 cores: short runs, and 1- and 2-call teacher rows
    # from three solvers, timed once (each solver's jit is most of an image row's cost)
    for name in CM_METHODS:
      c[name].num_steps = 800
    c.ect.stage_steps = 200
    c.eval.solvers = ("dpm_solver_pp_2m", "unipc_2", "heun")
    c.eval.repeats = 1
  if method == "gpd":
    c.student.kwargs.num_classes = c.gpd.num_classes
  if method in DM_METHODS:
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
      init_from_copy=True, sigma_init=2.5,
      generator_steps=1,  # > 1: a k-step generator (DMD2's backward simulation)
      particle_lr=3e-2))  # SDS / VSD: the particles' Adam step (cosine decay)
  if method == "dmd":  # the regression's pairs: 8192, by a 16-call DPM-Solver++(3M) (~1e-3 off)
    c.pairs.num_pairs = 8192
    c.pairs.solver, c.pairs.nfe = "dpm_solver_pp_3m", 16
  if method == "dmd2":  # k = 5 fake-score updates per step: fewer steps in the same time
    c.dm.num_steps = 1000
  c.eval.teacher_nfes = (10, 20, 50)  # what a one-step generator is up against
  if c.testbed == "digits":  # the U-Net teacher is the start; ~1 s per game step on 2 cores
    c.dm.num_steps = 200 if method == "dmd2" else 600
    c.eval.teacher_nfes = (10,)
    c.eval.solvers = ("dpm_solver_pp_2m", "heun")


def _tiny(c):
  c.batch_size = 64
  c.log_every = 10
  c.checkpoint_every = 20
  c.progress = False
  if c.student.network == "mlp":  # (the digits U-Net keeps its preset)
    c.student.kwargs.update(dict(features=32, num_blocks=1, emb_dim=32))  # keeps a method's extras
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
  c.gpd.stage1_steps = 20
  c.gpd.teacher_steps = 4
  c.gpd.steps_per_round = 20
  c.gpd.eval_steps = (2, 1)
  c.gpd.eval_w = (3.0,)
  c.tract.teacher_steps = 4
  c.tract.segments = (2, 1)
  c.tract.steps_per_phase = 20
  c.boot.num_steps = 20
  c.boot.grid_steps = 4
  c.pairs.num_pairs = 128
  c.pairs.chunk_size = 64
  c.pairs.solver = "dpm_solver_pp_2m"
  c.pairs.nfe = 4
  for name in ("cd", "ct", "ict", "ect", "scd", "meanflow"):
    c[name].num_steps = 20
  c.cd.num_intervals = 4
  c.ect.stage_steps = 5
  c.scd.warmup_steps = 5
  c.shortcut.num_steps = 20
  c.ctm.num_steps = 20
  c.ctm.num_intervals = 4
  c.eval.num_samples = 128
  c.eval.repeats = 1
  c.eval.ref_tol = max(c.eval.ref_tol, 1e-6)  # looser, never tighter (digits: 1e-3)
  c.eval.solvers = ("dpm_solver_pp_2m",)
  c.eval.always = ()
  c.eval.copy_rows = False
  c.optim.warmup_steps = 0
  if "dm" in c:
    c.dm.num_steps = 20
    c.eval.teacher_nfes = c.eval.teacher_nfes[:1]


def _quick(c):
  """The quickstart's budget (about 2 minutes on 2 CPU cores for pd_ring2d)."""
  c.batch_size = 256
  c.progress = False
  c.copy.num_steps = 1500
  c.pd.teacher_steps = 32
  c.pd.steps_per_round = 600
  c.pd.eval_steps = (4, 2, 1)
  c.kd.num_steps = 1000
  c.eval.num_samples = 1024


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
  elif option == "quick":
    _quick(c)
  elif option:
    raise ValueError(f"Unknown config option {option!r}; expected 'tiny' or 'quick'.")
  return c
