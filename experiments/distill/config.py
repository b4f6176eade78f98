"""Distillation configs: `--config=experiments/distill/config.py:<method>_<testbed>`.

COMMAND (from the repository root):
  python -m experiments.distill.main --config=experiments/distill/config.py:pd_gmm64 --workdir=runs/pd_gmm64

Methods: every module of `diffdistill.methods` (`methods.names()`): pd, gpd, kd, reflow, tract,
boot; cd, ct, ict, ect, scd, meanflow, shortcut, ctm; diff_instruct, dmd, dmd2, sid, sds, vsd.
A method module declares its config sections with their defaults (CONFIG), what it requires of
the rest of the config (SETTINGS: e.g. meanflow's rectified-flow teacher), its per-testbed
overrides (TESTBEDS) and its smoke-test size (TINY); this file holds only what every method
shares (teacher, student network, optimizer, the teacher copy, pairs, evaluation).
Testbeds:
  ring2d  the exact 8-mode ring teacher (analytic.ring2d) under VP-linear, MLP students.
  gmm64   the exact 16-component 64-D mixture (analytic.mixture64) under VP-linear, MLP students;
          `--config.teacher.mixture_file=PATH` swaps in any mixture file (weights, means, covs).
  digits  a trained digits teacher (`experiments/train_teacher` digits_cpu workdir, default
          runs/teacher_digits, `--config.teacher.path=...`), its U-Net as the student.
  import  a public checkpoint (`--config.teacher.path=...`: anything `diffdistill.interop.load`
          reads, a DiT / SiT .pt, a diffusers DiT or UNet2DModel folder, an EDM .pkl), its own
          network as the student, on its own schedule; without `--config.teacher.dataset` the
          students train on the teacher's own samples (config.pairs' solver, generated once into
          WORKDIR/teacher_samples). A latent teacher (DiT, SiT) takes its VAE,
          `--config.teacher.vae=FOLDER`: samples are decoded for the figures and FID.
          docs/teachers.md.
reflow variants use the exact teacher under rectified flow (the 1-rectified flow).
Every _gmm64 variant runs in under 10 minutes on 2 CPU cores (README.md has the measured times).
`tiny` shrinks any variant to a smoke test (`config.py:pd_ring2d,tiny`), `quick` to the
quickstart's budget (`config.py:pd_ring2d,quick`). `full` gives a method the steps (and settings)
it needs to reach its paper's strength where that is beyond the 10-minute budget (the module's
FULL, e.g. `config.py:meanflow_gmm64,full`; measured and timed in docs/consistency.md and
docs/distribution_matching.md).
"""

import json

import ml_collections

from diffdistill import methods
from diffdistill.methods import _common

TESTBEDS = ("ring2d", "gmm64", "digits", "import")


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
  c.teacher.kind = "analytic"        # analytic | file | workdir | import (experiments/teachers.py)
  c.teacher.name = "mixture64"
  c.teacher.mixture_file = ""        # a mixture .npz: sets kind 'file'
  c.teacher.path = ""                # a train_teacher workdir (kind 'workdir'), a checkpoint ('import')
  c.teacher.dataset = ""             # the data of a trained teacher (its config's dataset)
  c.teacher.label = -1               # an imported class-conditional teacher's class (-1: null)
  c.teacher.conditional = False      # or every class: students take the label (the dataset's or drawn)
  c.teacher.guidance = 1.0           # an imported conditional teacher's CFG scale w (1: none) ...
  c.teacher.guidance_t_min = 0.0     # ... applied at times t in [guidance_t_min, guidance_t_max]
  c.teacher.guidance_t_max = float("inf")
  c.teacher.vae = ""                 # a latent teacher's AutoencoderKL folder (kind 'import')
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
  # teacher and student network (e.g. --config.copy.dir=runs/copy_gmm64): the directory records
  # what it was fitted for (identity.json: teacher, schedule, network, output kind) and a run that
  # needs another copy is refused before it starts; steps and rates are not checked (a larger
  # num_steps trains the shared copy on). learning_rate (0: optim's) is the copy's own: the copy
  # is fitted from scratch, while every later stage fine-tunes
  c.copy = ml_collections.ConfigDict(dict(num_steps=3000, weighting="truncated_snr",
                                          time_sampler="logsnr_uniform", dir="",
                                          learning_rate=0.0))
  # offline teacher pairs (kd, reflow, dmd's regression)
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
      teacher_nfes=(),  # more NFEs with teacher rows only (distribution matching: 10, 20, 50)
      # digits teachers: FD-digits / digits IS with this classifier (trained and saved on first
      # use, ~20 s; metrics/digits.py)
      digits_classifier="runs/digits_classifier.npz"))
  # FID of every student as the papers compute it (evaluation.fid_scores): num_samples from fresh
  # noise, decoded by the teacher's VAE if latent, quantised to uint8, the FID Inception
  # (`inception`: NVIDIA's .pkl, pytorch-fid's .pth, or an .npz) against `reference` statistics
  # of the same port (.npz / .pkl); off when empty
  c.eval.fid = ml_collections.ConfigDict(dict(reference="", inception="", num_samples=50_000,
                                              batch_size=250, seed=2))
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
    c.teacher.schedule = ""  # its own (EDM); a method that sets another reschedules the teacher
    # a student on another schedule than the teacher's cannot start from its weights: it is a
    # fresh U-Net of the teacher's architecture, fitted to the rescheduled teacher (the copy stage)
    c.student.network = "unet_digits8"  # digits_cpu's preset: match any other teacher's network
    c.student.kwargs = ml_collections.ConfigDict()
    c.batch_size = 64
    c.copy.num_steps = 0
    c.eval.num_samples = 256
    c.eval.ref_tol = 1e-3  # the U-Net's own adaptive solve (float32): tighter costs many minutes
    c.pairs.num_pairs = 4096
    c.pairs.chunk_size = 512
  elif testbed == "import":
    c.teacher.kind = "import"
    c.teacher.path = ""  # required: the checkpoint
    c.teacher.schedule = ""  # its own
    c.batch_size = 32
    c.copy.num_steps = 0
    c.eval.num_samples = 64
    c.eval.ref_tol = 1e-3  # a large network's float32 adaptive solve
    c.eval.solvers = ("dpm_solver_pp_2m", "unipc_2", "heun")
    # the teacher's own samples as data (without teacher.dataset): 20 DPM-Solver++(2M) calls each
    c.pairs.num_pairs = 2048
    c.pairs.chunk_size = 256
    c.pairs.solver = "dpm_solver_pp_2m"
    c.pairs.nfe = 20
  elif testbed == "gmm64":
    # the 64-D, 16-component denoiser is hard to fit: at the default 5e-4 the 3000-step copy sat
    # at x0 MSE 3.1e-3 and limited every student (README); 2e-3 halves it
    c.copy.learning_rate = 2e-3
    c.copy.num_steps = 4000
  else:
    raise ValueError(f"Unknown testbed {testbed!r}; expected one of {TESTBEDS}.")


def _method(c, name):
  """The method module's sections, requirements and testbed overrides (diffdistill.methods)."""
  module = methods.get(name)
  c.method = name
  refused = module.TESTBEDS.get(c.testbed)
  if isinstance(refused, str):
    raise ValueError(refused)
  for section, defaults in module.CONFIG.items():
    c[section] = ml_collections.ConfigDict(dict(defaults))
  _common.apply_overrides(c, module.SETTINGS)
  _common.apply_overrides(c, refused or {})
  if c.testbed == "digits" and c.teacher.schedule:  # rescheduled teacher: no weights to start from
    c.copy.num_steps = 1500
    c.copy.learning_rate = 1e-3
  return module


def _tiny(c, module):
  c.batch_size = 64
  c.log_every = 10
  c.checkpoint_every = 20
  c.progress = False
  if c.student.network == "mlp":  # (the digits U-Net keeps its preset)
    c.student.kwargs.update(dict(features=32, num_blocks=1, emb_dim=32))  # keeps a method's extras
  c.copy.num_steps = 40
  c.pairs.num_pairs = 128
  c.pairs.chunk_size = 64
  c.pairs.solver = "dpm_solver_pp_2m"
  c.pairs.nfe = 4
  c.eval.num_samples = 128
  c.eval.repeats = 1
  c.eval.ref_tol = max(c.eval.ref_tol, 1e-6)  # looser, never tighter (digits: 1e-3)
  c.eval.solvers = ("dpm_solver_pp_2m",)
  c.eval.always = ()
  c.eval.copy_rows = False
  c.optim.warmup_steps = 0
  _common.apply_overrides(c, module.TINY)


def _full(c, module):
  """The method's steps (and settings) for its paper's strength on this testbed (module.FULL)."""
  full = getattr(module, "FULL", {})
  if c.testbed not in full:
    have = sorted(f"{name}_{testbed}" for name in methods.names()
                  for testbed in getattr(methods.get(name), "FULL", {}))
    raise ValueError(f"{c.method}_{c.testbed} has no ',full' budget: its variant already runs at "
                     f"the budget it was measured at. Variants with one: {have}.")
  _common.apply_overrides(c, full[c.testbed])


def _quick(c, module):
  """The quickstart's budget (about 2 minutes on 2 CPU cores for pd_ring2d)."""
  c.batch_size = 256
  c.progress = False
  c.copy.num_steps = 1500
  c.eval.num_samples = 1024
  _common.apply_overrides(c, getattr(module, "QUICK", {}))


def parse_overrides(items) -> dict:
  """{"dotted.key": value} from command-line "KEY=VALUE" strings (a value is read as JSON where
  it parses, e.g. 0.5, true, [1, 2], else kept as the string)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--config takes KEY=VALUE, got {item!r}.")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def get_config(arg: str = "pd_gmm64") -> ml_collections.ConfigDict:
  variant, _, option = arg.partition(",")
  method, _, testbed = variant.rpartition("_")
  if not method:
    raise ValueError(f"config variant must be <method>_<testbed>[,tiny|,quick|,full], e.g. "
                     f"pd_gmm64; got {arg!r}. "
                     f"Methods: {methods.names()}; testbeds: {TESTBEDS}.")
  c = _base()
  _testbed(c, testbed)
  module = _method(c, method)
  if option == "tiny":
    _tiny(c, module)
  elif option == "quick":
    _quick(c, module)
  elif option == "full":
    _full(c, module)
  elif option:
    raise ValueError(f"Unknown config option {option!r}; expected 'tiny', 'quick' or 'full'.")
  return c
