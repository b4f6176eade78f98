"""Diff-Instruct (Luo et al. 2023): a one-step generator trained by the integral KL between its
noised marginals and the teacher's, through a fake score fitted to its samples.

Losses: `losses.distribution_matching.diff_instruct` (module `_distribution` has the game).
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
  return _distribution.generator_sampler("diff_instruct", net, t_start=t_start,
                                         sigma_init=sigma_init, generator_steps=generator_steps)


def build(config, setup):
  c = config.dm

  def method(generator, net, to_init, common_kw):
    return dm.diff_instruct(generator, setup.teacher.apply, net.denoise, weighting=c.weighting,
                            time_sampler=c.time_sampler, **common_kw)

  return _distribution.build_game(config, setup, "diff_instruct", method)
