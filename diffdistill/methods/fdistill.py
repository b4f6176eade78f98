"""f-distill (Xu, Nie & Vahdat 2025): a one-step generator trained by a general f-divergence,
DMD's normalized score difference weighted by h(r) = r^2 f''(r) of the density ratio r = p_t/q_t,
which a discriminator (a linear head on the fake score's trunk features) estimates; reverse KL
(h = 1) is DMD. The paper's best is Jensen-Shannon, the default here.

Losses: `losses.f_distill.f_distill` (module `_distribution` has the game and the generator).
"""

from __future__ import annotations

from diffdistill import nets
from diffdistill.losses import f_distill
from diffdistill.methods import _distribution

CONFIG = {**_distribution.section(),
          "fdistill": dict(divergence="js", normalize=True, max_log_ratio=10.0)}
SETTINGS = dict(_distribution.SETTINGS)
TESTBEDS = {"digits": dict(_distribution.DIGITS)}
TINY = dict(_distribution.TINY)
EXTRA_COND = ()
CONDITIONAL = True  # G, teacher and fake score read batch["label"]; the sampler passes it on


def sampler(net, *, t_start: float, sigma_init: float = 2.5, generator_steps: int = 1, **_):
  """The generator G(x_T) (nfe = generator_steps)."""
  return _distribution.generator_sampler("fdistill", net, t_start=t_start, sigma_init=sigma_init,
                                         generator_steps=generator_steps)


def build(config, setup):
  c, f = config.dm, config.fdistill
  f_distill.weight(0.0, divergence=f.divergence)  # a bad name fails before anything runs
  ratio = f.divergence != "reverse_kl"

  def method(generator, net, to_init, common_kw):
    return f_distill.f_distill(
        generator, setup.teacher.apply, net.denoise, divergence=f.divergence,
        features=nets.trunk_features(net)[0] if ratio else None, normalize=f.normalize,
        max_log_ratio=f.max_log_ratio, time_sampler=c.time_sampler, **common_kw)

  return _distribution.build_game(config, setup, "fdistill", method, gan=ratio)
