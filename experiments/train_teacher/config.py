"""Teacher training (denoising score matching) configs.

Variants (`--config=experiments/train_teacher/config.py:VARIANT`):

  toy2d_cpu   8-Gaussian ring in 2-D (toy2d/ring = analytic.ring2d), residual MLP, eps-prediction
              on the VP cosine schedule, v-prediction. 4k steps of batch 512: about 6 min
              measured on 2 shared CPU cores (other jobs running), + 1 min for the samples.
      python -m experiments.train_teacher.main \
        --config=experiments/train_teacher/config.py:toy2d_cpu --workdir=runs/teacher_toy2d

  gmm64_cpu   16-component Gaussian mixture in 64-D (gmm/mixture64 = analytic.mixture64), wider
              MLP, v-prediction. 4k steps of batch 512: about 12 min measured on 2 shared
              CPU cores (incl. generating the dataset once).
      python -m experiments.train_teacher.main \
        --config=experiments/train_teacher/config.py:gmm64_cpu --workdir=runs/teacher_gmm64

  digits_cpu  scikit-learn's 8x8 digits in [-1, 1], a small U-Net, EDM preconditioning and
              training (lognormal sigma). 4k steps of batch 64: about 15 min measured on 2
              shared CPU cores.
      python -m experiments.train_teacher.main \
        --config=experiments/train_teacher/config.py:digits_cpu --workdir=runs/teacher_digits

  cifar10_edm EDM's CIFAR-10 setting (Karras et al. 2022, Table 7, "config F" VP / DDPM++ column):
              DDPM++ U-Net (128 channels, mults 2-2-2, 4 blocks, attention at 16x16, dropout
              0.13, ~56M params), EDM preconditioning, P_mean = -1.2, P_std = 1.2, lambda(sigma)
              weighting, Adam lr 1e-3 with a 10M-image linear warm-up, batch 512, 200M images
              (390,625 steps), EMA half-life 0.5M images. Needs GPUs/TPUs: about 2 days on
              8 A100s in the paper; not run here. EDM's non-leaky augmentation is not implemented.
      python -m experiments.train_teacher.main \
        --config=experiments/train_teacher/config.py:cifar10_edm --workdir=runs/teacher_cifar10

Overrides: `--config.num_steps=80 --config.log_every=1 --config.checkpoint_every=20`;
schedule keywords by name, e.g. `--config.schedule.kwargs.t_max=0.9` (every keyword of every
schedule is declared, None meaning that schedule's default).
Mesh: `--config.mesh.fsdp=8` splits the params, Adam moments and EMAs of every leaf with at
least `mesh.min_size` elements over 8 devices (FSDP, docs/scaling.md); `--config.mesh.data`
defaults to the devices left; fsdp = 1 is pure data parallelism (the default).
Multi-host: add `--distributed` (and `--coordinator_address/--num_processes/--process_id`
where the cluster does not provide them).
"""

import ml_collections

# Every keyword that schedules.get accepts, declared so that each can be set from the command
# line (a ConfigDict field must exist to be overridden); None = the schedule's own default, and
# teacher.py passes only the keywords that are set. tests/test_train_teacher.py checks this
# list against the schedules' fields.
SCHEDULE_KWARGS = {
    "t_min": float, "t_max": float,                 # every family but EDM
    "beta_min": float, "beta_max": float,           # vp_linear
    "s": float,                                     # vp_cosine
    "beta_schedule": str, "num_steps": int,         # vp_discrete (a named beta list)
    "sigma_min": float, "sigma_max": float,         # ve, edm
    "sigma_data": float,                            # edm, trigflow
}


def _schedule(name: str, **kwargs) -> ml_collections.ConfigDict:
  """config.schedule: the registry name and every schedule keyword (unset ones None)."""
  c = ml_collections.ConfigDict()
  c.name = name
  c.kwargs = ml_collections.ConfigDict(
      {k: ml_collections.config_dict.placeholder(kind) for k, kind in SCHEDULE_KWARGS.items()})
  c.kwargs.update(kwargs)
  return c


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_steps = 4000
  c.batch_size = 512                 # global, over all devices and processes
  c.log_every = 100
  c.checkpoint_every = 1000          # 0: only at the end
  c.keep_checkpoints = 3
  c.max_nonfinite_in_row = 10
  c.ema = ml_collections.ConfigDict({"eval": 0.999})  # EMA copies of the params: name -> decay
  c.eval_ema = "eval"                # the EMA copy used by samples and evaluation
  c.sample_every = 0                 # samples (PNG + metrics vs exact data) every so many steps
  c.sample_at_end = True             # ... and after the last step
  c.num_eval_samples = 2000
  c.sampler_rtol = 1e-4              # PF-ODE tolerance of the evaluation sampler
  c.progress = True
  c.tensorboard = True               # TensorBoard scalars besides metrics.jsonl

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "toy2d/ring"
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)
  c.dataset.prefetch = 2
  c.dataset.pipeline = "native"      # or "grain" (diffdistill/data/grain_pipeline.py): another order
  c.dataset.workers = 0              # grain's worker processes (decoding / augmentation)
  c.dataset.num_examples = ml_collections.config_dict.placeholder(int)  # toy2d/gmm: None = 100k

  c.network = ml_collections.ConfigDict()
  c.network.name = "mlp"
  c.network.kwargs = ml_collections.ConfigDict(dict(features=256, num_blocks=4, emb_dim=128))

  c.schedule = _schedule("vp_cosine")

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = "v"                  # eps-prediction blows up at the low-SNR end of sampling
  c.loss.weighting = "v"             # plain v-MSE
  c.loss.time_sampler = "uniform"
  c.loss.cond_drop_prob = 0.0

  c.mesh = ml_collections.ConfigDict()  # train.sharding: data x fsdp x tensor = the devices
  c.mesh.data = ml_collections.config_dict.placeholder(int)  # None: the devices left
  c.mesh.fsdp = 1                    # > 1: FSDP over this many devices
  c.mesh.tensor = 1
  c.mesh.min_size = 2 ** 12          # leaves with fewer elements stay replicated

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 200
  c.optim.schedule = "cosine"
  c.optim.decay_steps = ml_collections.config_dict.placeholder(int)  # None: num_steps
  c.optim.end_factor = 0.05
  c.optim.grad_clip = 1.0
  c.optim.accumulation_steps = 1
  return c


def _use_edm(c: ml_collections.ConfigDict) -> None:
  """EDM's setting (Karras et al. 2022): sigma in [0.002, 80], sigma_data 0.5, preconditioned output,
  lambda(sigma) weighting and log-normal noise levels."""
  c.schedule = _schedule("edm", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
  c.loss.kind = "edm"
  c.loss.weighting = "edm"
  c.loss.time_sampler = "lognormal"


def toy2d_cpu() -> ml_collections.ConfigDict:
  """python -m experiments.train_teacher.main \\
       --config=experiments/train_teacher/config.py:toy2d_cpu --workdir=runs/teacher_toy2d
  (~6 min on 2 shared CPU cores)."""
  return _base()


def gmm64_cpu() -> ml_collections.ConfigDict:
  """python -m experiments.train_teacher.main \\
       --config=experiments/train_teacher/config.py:gmm64_cpu --workdir=runs/teacher_gmm64
  (~12 min on 2 shared CPU cores)."""
  c = _base()
  c.dataset.name = "gmm/mixture64"
  c.network.kwargs.features = 512
  c.optim.learning_rate = 5e-4
  return c


def digits_cpu() -> ml_collections.ConfigDict:
  """python -m experiments.train_teacher.main \\
       --config=experiments/train_teacher/config.py:digits_cpu --workdir=runs/teacher_digits
  (~15 min on 2 shared CPU cores)."""
  c = _base()
  c.dataset.name = "digits8"
  c.num_steps = 4000
  c.batch_size = 64
  c.log_every = 50
  c.optim.warmup_steps = 100
  c.network.name = "unet_digits8"    # nets.unet.PRESETS["digits8"]; kwargs override it
  c.network.kwargs = ml_collections.ConfigDict()
  _use_edm(c)
  c.optim.learning_rate = 2e-3
  c.num_eval_samples = 64
  c.sampler_rtol = 1e-3
  return c


def cifar10_edm() -> ml_collections.ConfigDict:
  """python -m experiments.train_teacher.main \\
       --config=experiments/train_teacher/config.py:cifar10_edm --workdir=runs/teacher_cifar10
  (GPUs/TPUs: EDM reports about 2 days on 8 A100s for 200M images)."""
  c = _base()
  c.dataset.name = "cifar10"
  c.num_steps = 390_625              # 200M images / 512
  c.batch_size = 512
  c.log_every = 500
  c.checkpoint_every = 10_000
  c.sample_every = 50_000
  c.num_eval_samples = 64
  c.sampler_rtol = 1e-3
  c.ema.eval = 0.999293              # half-life 0.5M images at 512 per step: 0.5 ** (512 / 5e5)
  c.network.name = "unet_ddpmpp_cifar10"  # nets.unet.PRESETS["ddpmpp_cifar10"]
  c.network.kwargs = ml_collections.ConfigDict()
  _use_edm(c)
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 19_531      # 10M images / 512
  c.optim.schedule = "constant"
  c.optim.end_factor = 0.0
  c.optim.grad_clip = 0.0
  return c


VARIANTS = {"toy2d_cpu": toy2d_cpu, "gmm64_cpu": gmm64_cpu, "digits_cpu": digits_cpu,
            "cifar10_edm": cifar10_edm}


def get_config(arg: str = "toy2d_cpu") -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f"Unknown config variant {arg!r}; expected one of {sorted(VARIANTS)}.")
  return VARIANTS[arg]()
