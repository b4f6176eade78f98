"""Score distillation sampling, SDS (Poole et al. 2023), as free particles: eval.num_samples
particles from N(0, I) moved by the exact teacher's score. The particles are the samples (NFE 0);
they collapse toward the modes' centres (docs/distribution_matching.md).

Loss: `losses.score_distillation.sds`.
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
      config, setup, "sds",
      lambda net: score_distillation.sds(setup.teacher.apply, schedule=net.schedule,
                                         time_sampler=c.time_sampler),
      variational=False)
