"""Variational score distillation, VSD (Wang et al. 2023), as free particles: SDS with the
particles' own score, a variational denoiser started from the network copy and fitted by DSM to
the particles, subtracted from the teacher's. The particles are the samples (NFE 0).

Loss: `losses.score_distillation.vsd`.
"""

from __future__ import annotations

from diffdistill.losses import score_distillation
from diffdistill.methods import _distribution

CONFIG = _distribution.section()
SETTINGS = dict(_distribution.SETTINGS)
TESTBEDS = {"digits": dict(_distribution.DIGITS)}
TINY = dict(_distribution.TINY)
EXTRA_COND = ()
sampler = None  # the particles are the samples


def build(config, setup):
  c = config.dm
  return _distribution.build_particles(
      config, setup, "vsd",
      lambda net: score_distillation.vsd(setup.teacher.apply, net.denoise, schedule=net.schedule,
                                         time_sampler=c.time_sampler,
                                         variational_repeats=c.fake_repeats),
      variational=True)
