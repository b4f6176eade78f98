"""Loss factories: each returns a pure `loss_fn(params, batch, rng, **other_params) -> (loss, aux)`."""

from diffdistill.losses.dsm import (DEFAULT_LOGSNR_BIN_EDGES, WEIGHTINGS, dsm_loss,
                                    output_to_x0_scale, x0_weighting)

__all__ = ["dsm_loss", "x0_weighting", "output_to_x0_scale", "WEIGHTINGS",
           "DEFAULT_LOGSNR_BIN_EDGES"]
