"""diffdistill: distilling diffusion models, and training-free accelerated sampling, in JAX."""

__version__ = "0.1.0"
