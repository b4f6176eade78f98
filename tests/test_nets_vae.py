"""Tests for diffdistill/nets/vae.py: shapes, the posterior clip, and SD-VAE's size.

Equivalence with diffusers' AutoencoderKL is in tests/test_interop_vae.py (marker `torch`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import nets


def test_autoencoder_shapes_and_logvar_clip():
  module = nets.AutoencoderKL(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  shapes = jax.eval_shape(lambda k: module.init(k, x)["params"], jax.random.key(0))
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.1, s.dtype), shapes)
  params["quant_conv"]["bias"] = params["quant_conv"]["bias"] + 100.0  # drives logvar past 20

  @jax.jit
  def roundtrip(params, x):
    mean, logvar = module.apply({"params": params}, x, method="encode")
    return mean, logvar, module.apply({"params": params}, mean, method="decode")

  mean, logvar, out = roundtrip(params, x)
  assert mean.shape == logvar.shape == (2, 4, 4, 4) and out.shape == x.shape
  np.testing.assert_array_equal(logvar, 20.0)
  with pytest.raises(ValueError, match="divisible by 2"):
    jax.eval_shape(lambda x: module.apply({"params": params}, x, method="encode"), x[:, :7])


def test_sd_vae_has_the_reference_parameter_count():
  """SD's kl-f8 VAE (widths 128-256-512-512, 2 blocks, 4 latent channels): 83,653,863 parameters,
  as diffusers' AutoencoderKL of the same config counts them."""
  module = nets.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
  shapes = jax.eval_shape(lambda k: module.init(k, jnp.zeros((1, 16, 16, 3)))["params"],
                          jax.random.key(0))
  assert nets.num_params(shapes) == 83_653_863
