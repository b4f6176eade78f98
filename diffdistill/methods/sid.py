"""Score identity distillation, SiD (Zhou et al. 2024): a one-step generator trained with the
score-identity loss weighted by alpha, through a fake score fitted to its samples.

Losses: `losses.distribution_matching.sid`.
"""

from __future__ import annotations

from diffdistill.losses import distribution_matching as dm
from diffdistill.methods import _distribution

CONFIG = _distribution.section()
SETTINGS = dict(_distribution.SETTINGS)
TESTBEDS = {"digits": dict(_distribution.DIGITS)}
TINY = dict(_distribution.TINY)
EXTRA_COND = ()
CONDITIONAL = True  # G, teacher and fake score read batch["label"]; the sampler passes it on


def sampler(net, *, t_start: float, sigma_init: float = 2.5, generator_steps: int = 1, **_):
  """The generator G(x_T) (nfe = generator_steps)."""
  return _distribution.generator_sampler("sid", net, t_start=t_start, sigma_init=sigma_init,
                                         generator_steps=generator_steps)


def build(config, setup):
  c = config.dm

  def method(generator, net, to_init, common_kw):
    return dm.sid(generator, setup.teacher.apply, net.denoise, alpha=c.sid_alpha,
                  time_sampler=c.time_sampler, **common_kw)

  return _distribution.build_game(config, setup, "sid", method)
