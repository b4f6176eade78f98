"""Distribution matching distillation, DMD (Yin et al. 2024): a one-step generator moved by the
difference of the fake and real scores (normalized), plus a regression on teacher pairs.

Losses: `losses.distribution_matching.dmd`; the regression's pairs: 8192, by a 16-call
DPM-Solver++(3M) (~1e-3 off the exact map).
"""

from __future__ import annotations

from diffdistill.losses import distribution_matching as dm
from diffdistill.methods import _distribution

CONFIG = _distribution.section(regression_weight=0.25)
SETTINGS = {**_distribution.SETTINGS, "pairs.num_pairs": 8192, "pairs.solver": "dpm_solver_pp_3m",
            "pairs.nfe": 16}
TESTBEDS = {"digits": dict(_distribution.DIGITS)}
# `,full`: 16x the steps at 4x the image papers' rates. Per-mode covariance error 0.632 +- 0.021
# (3 seeds; exact samples 0.32), against 1.27 at 1000 steps (1.64 at the papers' rates)
# (experiments/distill/README.md, "Why the one-step generators stretch their modes")
FULL = {"gmm64": {"dm.num_steps": 16000, "dm.generator_lr": 4e-4, "dm.fake_lr": 8e-4}}
TINY = dict(_distribution.TINY)
EXTRA_COND = ()
CONDITIONAL = True  # G, teacher and fake score read batch["label"]; the sampler passes it on


def sampler(net, *, t_start: float, sigma_init: float = 2.5, generator_steps: int = 1, **_):
  """The generator G(x_T) (nfe = generator_steps)."""
  return _distribution.generator_sampler("dmd", net, t_start=t_start, sigma_init=sigma_init,
                                         generator_steps=generator_steps)


def build(config, setup):
  c = config.dm

  def method(generator, net, to_init, common_kw):
    return dm.dmd(generator, setup.teacher.apply, net.denoise, time_sampler=c.time_sampler,
                  regression_weight=c.regression_weight, pair_noise_scale=to_init, **common_kw)

  return _distribution.build_game(config, setup, "dmd", method, pairs=c.regression_weight > 0)
