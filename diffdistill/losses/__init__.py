"""Loss factories: each returns a pure `loss_fn(params, batch, rng, **other_params) -> (loss, aux)`.

One module per method or family (`losses.kd`, `losses.consistency`, ...; docs/losses.md lists
every factory, its inputs and where they come from); `combine` sums losses on one player.
"""

from diffdistill.losses.combine import combine
from diffdistill.losses.dsm import (DEFAULT_LOGSNR_BIN_EDGES, WEIGHTINGS, dsm_loss,
                                    output_to_x0_scale, x0_weighting)

__all__ = ["combine", "dsm_loss", "x0_weighting", "output_to_x0_scale", "WEIGHTINGS",
           "DEFAULT_LOGSNR_BIN_EDGES"]
