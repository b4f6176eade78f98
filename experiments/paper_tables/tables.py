"""The paper tables that experiments/distill reproduces on the papers' own teachers.

Each `PaperTable` names the paper, its table and numbers, the distill variant that runs it and the
paper's settings as config overrides, the files the user supplies (no file is downloaded), the
device budget, and what differs from the paper. `main.py` turns one into a run:

  python -m experiments.paper_tables.main --list
  python -m experiments.paper_tables.main --table=sid_cifar10_uncond \
      --checkpoint=edm-cifar10-32x32-uncond-vp.pkl --fid_reference=cifar10_train_stats.npz \
      --inception=pt_inception-2015-12-05-6726825d.pth --workdir=runs/paper/sid_cifar10

Overrides come in two kinds: `method` (the paper's method hyperparameters: kept by `--tiny`) and
`scale` (steps, batch size, sample counts: replaced by the tiny variant's). A table the library
cannot run yet says what is missing in `blocked`; its command is refused with that reason.
"""

from __future__ import annotations

import dataclasses

# where the users get the common files (never downloaded by the library)
EDM_CIFAR10_UNCOND = ("edm-cifar10-32x32-uncond-vp.pkl, from the links in NVlabs/edm's README "
                      "(https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/)")
INCEPTION = ("NVIDIA's inception-2015-12-05.pkl (the detector of EDM's fid.py, from "
             "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/"
             "metrics/inception-2015-12-05.pkl) or pytorch-fid's "
             "pt_inception-2015-12-05-6726825d.pth "
             "(another port: close, not identical FIDs), or an .npz conversion of either "
             "(docs/metrics.md)")
CIFAR10_STATS = ("with NVIDIA's Inception: EDM's fid-refs/cifar10-32x32.npz "
                 "(https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz); with "
                 "pytorch-fid's: the statistics of the 50,000 CIFAR-10 training images computed "
                 "with it (`python -m experiments.evaluate.main --samples=cifar10_train.npz "
                 "--inception=... --statistics_out=cifar10_train_stats.npz`)")
PORT_NOTE = ("The paper's FID uses NVIDIA's Inception port (EDM's fid.py): pass its .pkl and EDM's "
             "fid-refs for the paper's measure; pytorch-fid's port gives close but not identical "
             "FIDs (docs/metrics.md).")


@dataclasses.dataclass(frozen=True)
class PaperTable:
  name: str
  paper: str              # authors, year, title
  where: str              # the table (or abstract) the numbers come from
  metric: str             # what the numbers measure
  numbers: dict           # NFE -> the paper's value
  variant: str            # experiments/distill config variant
  files: dict             # flag of main.py -> what it is and where it comes from
  budget: str             # the device budget the paper's run needs
  method: dict = dataclasses.field(default_factory=dict)  # the paper's method settings
  scale: dict = dataclasses.field(default_factory=dict)   # steps, batch, samples
  differences: tuple = ()  # what differs from the paper, stated
  blocked: str = ""        # non-empty: what the library lacks to run it
  student: str = ""        # the student's row in the distill table (default: the method's name)

  @property
  def student_row(self) -> str:
    return self.student or self.variant.rsplit("_", 1)[0]


TABLES = {t.name: t for t in (
    PaperTable(
        name="sid_cifar10_uncond",
        paper="Zhou et al. 2024, Score identity Distillation (ICML)",
        where="Table 1 (CIFAR-10 unconditional, alpha = 1.2)",
        metric="FID, 50k samples, one step", numbers={1: 1.92},
        variant="sid_import", student="sid generator",
        files={"checkpoint": EDM_CIFAR10_UNCOND, "fid_reference": CIFAR10_STATS,
               "inception": INCEPTION},
        budget="500M generator images at batch 256 (1.95M steps): days on 4-8 A100s "
               "(the official run script's --duration 500)",
        method={"dm.sid_alpha": 1.2, "dm.sigma_init": 2.5, "dm.generator_lr": 1e-5,
                "dm.fake_lr": 1e-5, "optim.b1": 0.0, "optim.b2": 0.999,
                "optim.schedule": "constant", "optim.warmup_steps": 0, "optim.grad_clip": 0.0},
        scale={"batch_size": 256, "dm.num_steps": 1_953_125, "eval.num_samples": 1024},
        differences=(
            "SiD draws the fake score's noise level from t <= 800 of EDM's 1000 steps (--tmax "
            "800); dm.time_sampler here is uniform over the whole range.",
            "SiD is data-free; without --dataset the students' data are the teacher's own samples "
            "(config.pairs), which SiD's generator loss does not read.", PORT_NOTE)),
    PaperTable(
        name="ect_cifar10_uncond",
        paper="Geng et al. 2025, Consistency Models Made Easy (ICLR)",
        where="abstract: 2-step FID 2.73 within 1 A100 hour",
        metric="FID, 50k samples", numbers={2: 2.73},
        variant="ect_import",
        files={"checkpoint": EDM_CIFAR10_UNCOND, "dataset": "cifar10 (TFDS; ECT tunes on data)",
               "fid_reference": CIFAR10_STATS, "inception": INCEPTION},
        budget="about 1 A100 hour for the 2.73 run",
        method={"ect.q": 2.0, "ect.p_mean": -1.1, "ect.p_std": 2.0,
                "ect.distance": "pseudo_huber"},
        scale={"batch_size": 128, "ect.num_steps": 8000, "ect.stage_steps": 1000,
               "eval.num_samples": 1024},
        differences=(
            "The step count of the one-hour run is ours (8000 steps at batch 128, about 1M "
            "images); ECT's longer CIFAR-10 runs reach lower FIDs.",
            "ECT trains with dropout 0.2 in the U-Net; the imported EDM network runs without "
            "dropout.", PORT_NOTE)),
    PaperTable(
        name="pd_cifar10",
        paper="Salimans & Ho 2022, Progressive Distillation for Fast Sampling of Diffusion "
              "Models (ICLR)",
        where="CIFAR-10 results (unconditional, 1/2/4/8 sampling steps)",
        metric="FID, 50k samples", numbers={1: 9.12, 2: 4.51, 4: 3.00, 8: 2.57},
        variant="pd_import",
        files={"checkpoint": EDM_CIFAR10_UNCOND, "dataset": "cifar10 (TFDS; PD distils on data)",
               "fid_reference": CIFAR10_STATS, "inception": INCEPTION},
        budget="13 halvings from 8192 steps, 50k updates each at batch 128: about a day on 8 "
               "accelerators",
        method={"pd.weighting": "truncated_snr"},  # the paper's "truncated SNR" weighting
        scale={"batch_size": 128, "pd.teacher_steps": 8192, "pd.eval_steps": (8, 4, 2, 1),
               "pd.steps_per_round": 50_000, "eval.num_samples": 1024},
        differences=(
            "The paper distils its own VP cosine-schedule teacher with v-prediction; this row "
            "distils EDM's CIFAR-10 network (a stronger teacher, on EDM's schedule), so the "
            "numbers are a reference, not a replication.",
            "Steps per round and batch as we read the paper: check them against its appendix. "
            "The paper's step grid is uniform in its cosine schedule's time; on EDM's schedule "
            "the grid is uniform in logSNR (pd.spacing 'logsnr').",
            PORT_NOTE)),
    PaperTable(
        name="scd_cifar10_uncond",
        paper="Lu & Song 2025, Simplifying, Stabilizing and Scaling Continuous-Time Consistency "
              "Models (ICLR)",
        where="abstract: 2-step FID 2.06 on CIFAR-10 (1-step 2.97)",
        metric="FID, 50k samples", numbers={1: 2.97, 2: 2.06},
        variant="scd_import",
        files={"checkpoint": EDM_CIFAR10_UNCOND, "dataset": "cifar10 (TFDS)",
               "fid_reference": CIFAR10_STATS, "inception": INCEPTION},
        budget="hundreds of thousands of steps at batch 512: days on 8 A100s",
        method={"scd.p_mean": -1.0, "scd.p_std": 1.4, "scd.tangent_normalization": 0.1},
        scale={"batch_size": 512, "scd.num_steps": 400_000, "scd.warmup_steps": 10_000,
               "eval.num_samples": 1024},
        differences=(
            "The paper's CIFAR-10 numbers are of its own TrigFlow network (positional time "
            "embedding, adaptive double normalization, consistency training); here sCD starts from "
            "EDM's U-Net read on TrigFlow through the exact change of schedule "
            "(parametrization.rescheduled_net), whose time input is EDM's log(sigma)/4.",
            "The step count is ours.", PORT_NOTE)),
    PaperTable(
        name="dmd2_imagenet64",
        paper="Yin et al. 2024, Improved Distribution Matching Distillation (NeurIPS)",
        where="ImageNet 64x64, one step (with the GAN term, longer training)",
        metric="FID, 50k samples, class-conditional", numbers={1: 1.28},
        variant="dmd2_import", student="dmd2 generator",
        files={"checkpoint": "edm-imagenet-64x64-cond-adm.pkl, from the links in NVlabs/edm's "
                             "README (EDM's ADM network, 1000 classes)",
               "dataset": "imagenet_resized/64x64 (TFDS, with labels: one generator over all "
                          "1000 classes, each sample at its data label)",
               "fid_reference": "FID statistics of ImageNet 64x64 (the training images) computed "
                                "with the same Inception (`python -m experiments.evaluate.main "
                                "--statistics_out=...`); EDM's fid-refs/imagenet-64x64.npz holds "
                                "them under NVIDIA's port",
               "inception": INCEPTION},
        budget="200k steps at batch 280 (DMD2's model zoo: 53 hours on 7 A100s for FID 1.51), "
               "then 140k more for 1.28",
        method={"teacher.conditional": True, "dm.generator_lr": 2e-6, "dm.fake_lr": 2e-6,
                "dm.fake_repeats": 5, "dm.gan_weight": 3e-3, "dm.sigma_init": 80.0,
                "dm.regression_weight": 0.0, "dm.time_sampler": "uniform",
                "optim.schedule": "constant", "optim.warmup_steps": 0},
        scale={"batch_size": 280, "dm.num_steps": 200_000, "eval.num_samples": 1024},
        differences=(
            "The 1.28 row is DMD2's 410k-step run without the GAN term (generator and fake score "
            "lr 2e-6, FID 2.61) resumed for 140k steps with it at lr 5e-7; this config is the "
            "single run of their model zoo (GAN from the start, 200k steps, FID 1.51). For the "
            "second phase, rerun from its checkpoint with --config dm.gan_weight=0.003 "
            "dm.generator_lr=5e-7 dm.fake_lr=5e-7.",
            "DMD2 trains its GAN classifier inside the fake score's update (loss weight 1e-2 "
            "beside the fake DSM); here the head is its own player (the discriminator), on the "
            "fake score's bottleneck features, at the fake score's learning rate.",
            "DMD2 trains in bfloat16 (float16 diverged for them); this config runs float32 "
            "unless a precision policy is set.", PORT_NOTE)),
    PaperTable(
        name="meanflow_imagenet256",
        paper="Geng et al. 2025, Mean Flows for One-step Generative Modeling",
        where="ImageNet 256x256 (latent), Table 2: MeanFlow-XL/2, one step",
        metric="FID, 50k samples, class-conditional", numbers={1: 3.43},
        variant="meanflow_import",
        files={"checkpoint": "SiT-XL-2-256x256.pt, from the links in willisma/SiT's README (the "
                             "student starts from its weights; it is also the teacher)",
               "vae": "stabilityai/sd-vae-ft-ema (a diffusers AutoencoderKL folder; DiT's and "
                      "SiT's VAE)",
               "fid_reference": "ADM's VIRTUAL_imagenet256_labeled.npz (the reference batch of "
                                "openai/guided-diffusion's evaluator; its mu / sigma are read)",
               "inception": INCEPTION},
        budget="240 epochs of ImageNet at batch 256 (about 1.2M steps) on TPU / GPU pods",
        method={"teacher.conditional": True, "teacher.guidance": 2.5,
                "teacher.guidance_t_max": 0.75, "meanflow.p_mean": -0.4, "meanflow.p_std": 1.0,
                "meanflow.ratio_r_neq_t": 0.25, "meanflow.adaptive_p": 1.0,
                "optim.learning_rate": 1e-4, "optim.schedule": "constant",
                "optim.warmup_steps": 0, "eval_ema": 0.9999},
        scale={"batch_size": 256, "meanflow.num_steps": 1_200_000, "eval.num_samples": 1024},
        differences=(
            "MeanFlow's 3.43 is trained from scratch on ImageNet latents, its instantaneous "
            "velocity the conditional eps - x with classifier-free guidance mixed into the target "
            "(omega = 0.2, kappa = 0.92: an effective scale omega / (1 - kappa) = 2.5, applied for "
            "t <= 0.75 as in NVIDIA FastGen's MeanFlow XL/2 config). Here MeanFlow is distilled: "
            "the student is SiT-XL/2 with an extra input r (read as SiT reads t, its projection "
            "starting at zero) initialised at the checkpoint, and its target velocity is the SiT "
            "teacher's, guided at w = 2.5 for t <= 0.75, on the teacher's own samples at labels "
            "drawn uniformly (no ImageNet needed).",
            "MeanFlow's network embeds (t, t - r); ours embeds (t, r), each through the "
            "checkpoint's time embedding.",
            "The step count is the paper's from-scratch budget; a student starting from SiT-XL/2 "
            "may need far fewer (not measured).",
            "ADM's evaluator runs the TF Inception graph itself; NVIDIA's port resizes as "
            "TF does, pytorch-fid's does not (docs/metrics.md).")),
)}


def names() -> list[str]:
  return sorted(TABLES)


def get(name: str) -> PaperTable:
  if name not in TABLES:
    raise ValueError(f"Unknown paper table {name!r}; known: {names()}.")
  return TABLES[name]


__all__ = ["PaperTable", "TABLES", "names", "get"]
