"""Tests for diffdistill/nets/ddpm_unet.py: shapes, labels, DDPM CIFAR-10's size.

Equivalence with diffusers' UNet2DModel is in tests/test_interop_ddpm_unet.py (marker `torch`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import nets


def test_ddpm_unet_cifar10_has_the_papers_size():
  """The default layout is DDPM's CIFAR-10 network (google/ddpm-cifar10-32): 35.7M parameters
  (Ho et al. 2020, Sec. 4); diffusers' UNet2DModel of that config counts 35,746,307."""
  module = nets.get_network("ddpm_unet")
  shapes = jax.eval_shape(lambda k: nets.init_params(module, k, jnp.zeros((1, 32, 32, 3))),
                          jax.random.key(0))
  assert nets.num_params(shapes) == 35_746_307


def test_ddpm_unet_small_shapes_and_label_errors():
  module = nets.get_network("ddpm_unet", block_out_channels=(8, 16), norm_num_groups=4,
                            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_classes=3)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
  params = jax.eval_shape(lambda k: nets.init_params(module, k, x), jax.random.key(0))
  apply = nets.make_apply(module)
  out = jax.eval_shape(lambda p: apply(p, x, jnp.array([0.1, 0.9]), label=jnp.array([0, 2])), params)
  assert out.shape == x.shape and out.dtype == x.dtype
  with pytest.raises(ValueError, match="label is missing"):
    jax.eval_shape(lambda x: apply(params, x, jnp.array([0.1, 0.9])), x)
