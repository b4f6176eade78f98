"""Tests for diffdistill/nets: shapes, dtypes, conditioning, dropout, the registry, parameter counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import nets, parametrization, schedules
from diffdistill.nets import embeddings, unet

# One resolution level (attention in the middle block only): the cheapest U-Net to compile.
TINY_UNET = dict(model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(),
                 channel_mult_emb=2)
# Two levels: exercises down/up-sampling, skip concatenation and attention at a chosen resolution.
SMALL_UNET = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                  channel_mult_emb=2)


def _random_params(module, x, seed=0, scale=0.5):
  """N(0, scale^2) params of module's shapes, built from jax.eval_shape: no init compile (the
  tests stay fast), and no zero-initialized layer hides the effect of dropout or labels."""
  shapes = jax.eval_shape(lambda k: nets.init_params(module, k, x), jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


# ---------------------------------------------------------------------------------------------
# Time embeddings.
# ---------------------------------------------------------------------------------------------


def test_sinusoidal_embedding_matches_its_formula():
  t = jnp.array([0.0, 0.25, 1.0])
  emb = embeddings.SinusoidalEmbedding(dim=8, scale=1000.0).apply({}, t)
  freqs = 1000.0 * 10000.0 ** (-np.arange(4) / 3)  # endpoint: last frequency = scale / max_positions
  phase = np.asarray(t)[:, None] * freqs
  np.testing.assert_allclose(emb, np.concatenate([np.sin(phase), np.cos(phase)], 1), atol=2e-4)
  assert emb.shape == (3, 8) and emb.dtype == jnp.float32
  # without endpoint (EDM's default, its ADM network): exponents -i / (dim/2)
  emb = embeddings.SinusoidalEmbedding(dim=8, scale=1.0, endpoint=False).apply({}, t)
  phase = np.asarray(t)[:, None] * 10000.0 ** (-np.arange(4) / 4)
  np.testing.assert_allclose(emb, np.concatenate([np.sin(phase), np.cos(phase)], 1), atol=1e-6)


def test_fourier_embedding_is_fixed_and_has_the_requested_scale():
  module = embeddings.FourierEmbedding(dim=4096, scale=16.0)
  variables = module.init(jax.random.key(0), jnp.zeros(2))
  assert not jax.tree.leaves(variables)  # nothing to train
  t = jnp.array([0.0, 1e-3])
  emb = module.apply({}, t)
  assert emb.shape == (2, 4096)
  np.testing.assert_allclose(emb[0], np.r_[np.zeros(2048), np.ones(2048)], atol=1e-6)
  # At s = 1e-3 every phase 2 pi f s is within (-pi, pi), so f is recovered exactly: std 16.
  freqs = np.arctan2(np.asarray(emb[1, :2048]), np.asarray(emb[1, 2048:])) / (2 * np.pi * 1e-3)
  np.testing.assert_allclose(np.std(freqs), 16.0, rtol=0.06)
  assert abs(np.mean(freqs)) < 4 * 16.0 / np.sqrt(2048)
  np.testing.assert_allclose(module.apply({}, t), emb)  # deterministic


@pytest.mark.parametrize("kind", ["positional", "fourier"])
def test_embeddings_separate_neighbouring_times_in_both_input_ranges(kind):
  """t in [0, 1] (most kinds) and c_noise = -lambda/8 in [-1.55, 1.1] (kind 'edm'): nearby inputs
  map to distinct features and far inputs to nearly orthogonal ones."""
  module = embeddings.time_embedding(kind, 128)
  for lo, hi in [(0.0, 1.0), (-1.55, 1.1)]:
    s = jnp.linspace(lo, hi, 200)
    e = module.apply({}, s)
    e = e / jnp.linalg.norm(e, axis=1, keepdims=True)
    gram = np.asarray(e @ e.T)
    assert np.all(np.diag(gram, 1) < 0.9999)  # neighbours (spacing <= 0.013) distinguishable
    assert abs(gram[0, -1]) < 0.5  # the ends far apart


def test_embedding_errors():
  with pytest.raises(ValueError, match="Unknown time embedding 'gaussian'"):
    embeddings.time_embedding("gaussian", 16)
  with pytest.raises(ValueError, match="dim must be even"):
    embeddings.SinusoidalEmbedding(dim=7).apply({}, jnp.zeros(2))
  with pytest.raises(ValueError, match=r"shape \[B\]"):
    embeddings.SinusoidalEmbedding(dim=8).apply({}, jnp.zeros((2, 1)))


# ---------------------------------------------------------------------------------------------
# MLP.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("embedding,dtype", [("positional", jnp.float32), ("fourier", jnp.bfloat16)])
def test_mlp_shapes_and_dtypes(embedding, dtype):
  module = nets.get_network("mlp", features=32, num_blocks=2, emb_dim=16, embedding=embedding,
                            dtype=dtype)
  x = jnp.ones((5, 64))
  params = nets.init_params(module, jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  apply = jax.jit(nets.make_apply(module))
  out = apply(params, x, jnp.linspace(0, 1, 5))
  assert out.shape == x.shape and out.dtype == x.dtype
  assert apply(params, x, 0.5).shape == x.shape  # a scalar t broadcasts


def test_mlp_depends_on_time_and_input():
  module = nets.get_network("mlp", features=32, num_blocks=2, emb_dim=16)
  x = jax.random.normal(jax.random.key(1), (4, 2))
  params = _random_params(module, x)
  apply = jax.jit(nets.make_apply(module))
  a = apply(params, x, jnp.full(4, 0.2))
  assert float(jnp.max(jnp.abs(a - apply(params, x, jnp.full(4, 0.8))))) > 1e-3
  assert float(jnp.max(jnp.abs(a - apply(params, x + 1.0, jnp.full(4, 0.2))))) > 1e-3
  # At init the output layer is zero: the network starts at out = 0.
  fresh = nets.init_params(module, jax.random.key(0), x)
  np.testing.assert_array_equal(apply(fresh, x, jnp.full(4, 0.2)), 0.0)


@pytest.mark.parametrize("name,kwargs,shape", [
    ("mlp", dict(features=32, num_blocks=2, emb_dim=16, dropout=0.5), (6, 2)),
    pytest.param("unet", dict(TINY_UNET, dropout=0.5), (2, 4, 4, 1), marks=pytest.mark.slow),
])
def test_dropout_only_with_a_key(name, kwargs, shape):
  module = nets.get_network(name, **kwargs)
  x = jax.random.normal(jax.random.key(1), shape)
  params = _random_params(module, x)
  apply = jax.jit(nets.make_apply(module))
  t = jnp.full(shape[0], 0.5)
  det = apply(params, x, t)
  np.testing.assert_array_equal(det, apply(params, x, t))
  k1, k2 = jax.random.key(3), jax.random.key(4)
  d1 = apply(params, x, t, dropout_rng=k1)
  np.testing.assert_array_equal(d1, apply(params, x, t, dropout_rng=k1))
  assert float(jnp.max(jnp.abs(d1 - det))) > 1e-3
  assert float(jnp.max(jnp.abs(d1 - apply(params, x, t, dropout_rng=k2)))) > 1e-3
  no_dropout = nets.get_network(name, **{**kwargs, "dropout": 0.0})
  np.testing.assert_allclose(nets.make_apply(no_dropout)(params, x, t, dropout_rng=k1), det,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kwargs,shape", [
    ("mlp", dict(features=32, num_blocks=2, emb_dim=16, num_classes=3), (4, 2)),
    pytest.param("unet", dict(TINY_UNET, num_classes=3), (2, 4, 4, 3), marks=pytest.mark.slow),
])
def test_class_conditioning_and_the_null_label(name, kwargs, shape):
  module = nets.get_network(name, **kwargs)
  x = jax.random.normal(jax.random.key(1), shape)
  params = _random_params(module, x)
  apply = jax.jit(nets.make_apply(module))
  t = jnp.full(shape[0], 0.5)
  null = jnp.full(shape[0], 3)
  assert params["ConditionEmbedding_0"]["label_embed"]["embedding"].shape[0] == 4  # K + 1 rows
  out_null = apply(params, x, t, label=null)
  out_0 = apply(params, x, t, label=jnp.zeros(shape[0], int))
  assert float(jnp.max(jnp.abs(out_null - out_0))) > 1e-3
  # Classifier-free guidance through parametrization.guided: w = 0 is the null-label denoiser.
  denoise = parametrization.as_denoiser(apply, kind="eps", schedule=schedules.VPLinear())
  guided = parametrization.guided(denoise, 0.0, null_cond={"label": 3})
  np.testing.assert_allclose(guided(params, x, t, label=jnp.zeros(shape[0], int)),
                             denoise(params, x, t, label=null), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="needs label"):
    apply(params, x, t)
  unconditional = nets.get_network(name, **{**kwargs, "num_classes": 0})
  with pytest.raises(ValueError, match="unconditional network"):
    nets.make_apply(unconditional)(params, x, t, label=null)


@pytest.mark.parametrize("kind", parametrization.KINDS)
def test_networks_plug_into_every_parametrization(kind):
  module = nets.get_network("mlp", features=16, num_blocks=1, emb_dim=16)
  x = jax.random.normal(jax.random.key(1), (3, 2))
  params = _random_params(module, x)
  schedule = schedules.EDM() if kind == "edm" else schedules.VPCosine()
  t = jnp.array([0.1, 0.4, 0.9])
  denoise = parametrization.as_denoiser(nets.make_apply(module), kind=kind, schedule=schedule)
  x0 = denoise(params, x, t)
  assert x0.shape == x.shape and bool(jnp.all(jnp.isfinite(x0)))


def test_registry_errors():
  with pytest.raises(ValueError, match=r"Unknown network 'resnet'; expected one of \[.*'mlp'"):
    nets.get_network("resnet")
  with pytest.raises(ValueError, match="Bad arguments for network 'mlp'"):
    nets.get_network("mlp", widht=3)
  module = nets.get_network("mlp", features=8, num_blocks=1, emb_dim=8)
  params = _random_params(module, jnp.ones((2, 2)))
  with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[B\] = \[2\]"):
    nets.make_apply(module)(params, jnp.ones((2, 2)), jnp.ones(3))
  with pytest.raises(ValueError, match=r"shape \[B, d\]"):
    nets.make_apply(module)(params, jnp.ones((2, 2, 2)), jnp.ones(2))
  tiny = nets.get_network("unet", **SMALL_UNET)
  with pytest.raises(ValueError, match="NHWC"):
    nets.init_params(tiny, jax.random.key(0), jnp.ones((2, 8, 8)))
  with pytest.raises(ValueError, match="divisible by 2"):
    nets.init_params(tiny, jax.random.key(0), jnp.ones((2, 7, 7, 1)))
  with pytest.raises(ValueError, match="Unknown network 'unet_cifar'.*'unet_ddpmpp_cifar10'"):
    nets.get_network("unet_cifar")


# ---------------------------------------------------------------------------------------------
# U-Net.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,dtype", [(SMALL_UNET, jnp.float32), (TINY_UNET, jnp.bfloat16)])
def test_unet_shapes_and_dtypes(config, dtype):
  module = nets.get_network("unet", **config, embedding="fourier", dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  params = _random_params(module, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  apply = jax.jit(nets.make_apply(module))
  out = apply(params, x, jnp.array([0.1, 0.9]))
  assert out.shape == x.shape and out.dtype == x.dtype and bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.max(jnp.abs(out - apply(params, x, jnp.array([0.5, 0.5]))))) > 1e-3


def test_unet_blocks_start_as_scaled_identities():
  """Zero-initialized residual branches: a block with attention starts as (x / sqrt(2)) / sqrt(2)."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  emb = jnp.ones((2, 8))
  block = unet.UNetBlock(16, attention=True)
  out = jax.jit(lambda k: block.apply(block.init(k, x, emb, deterministic=True), x, emb,
                                      deterministic=True))(jax.random.key(1))
  np.testing.assert_allclose(out, x / 2, rtol=1e-6, atol=1e-6)
  assert unet.SKIP_SCALE == pytest.approx(1 / math.sqrt(2))


def test_unet_resampling_is_average_pool_and_nearest_neighbour():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(unet._downsample(x)[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
  np.testing.assert_array_equal(unet._upsample(unet._downsample(x))[0, :2, :2, 0], 2.5)


def test_fir_upsampling_is_four_times_the_transpose_of_fir_downsampling():
  """NCSN++'s [1, 3, 3, 1] filter: EDM's up-sampling is the transposed convolution of its
  down-sampling with 4x the kernel, so <up(y), x> = 4 <y, down(x)> exactly, borders included;
  both keep a constant away from the zero-padded border, and (1, 1) stays pooling / repeat."""
  taps = (1, 3, 3, 1)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  y = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
  down, up = unet._downsample(x, taps), unet._upsample(y, taps)
  assert down.shape == y.shape and up.shape == x.shape
  np.testing.assert_allclose(float(jnp.vdot(up, x)), 4 * float(jnp.vdot(y, down)), rtol=1e-5)
  ones = jnp.ones((1, 8, 8, 1))
  np.testing.assert_allclose(unet._downsample(ones, taps)[0, 1:-1, 1:-1], 1.0, rtol=1e-6)
  np.testing.assert_allclose(unet._upsample(ones, taps)[0, 2:-2, 2:-2], 1.0, rtol=1e-6)
  np.testing.assert_allclose(unet._downsample(x, (1, 1)), unet._downsample(x, (1, 1), pad=0),
                             rtol=1e-6)  # the (1, 1) fast path is the general filter's result
  with pytest.raises(ValueError, match=r"resample_filter must be a symmetric filter.*\(1, 3, 3\)"):
    nets.get_network("unet", resample_filter=(1, 3, 3)).init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
  with pytest.raises(ValueError, match=r"encoder must be one of \('standard', 'residual'\)"):
    nets.get_network("unet", encoder="skip").init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
  with pytest.raises(ValueError, match="freqs must hold dim/2 = 4 values, got 3"):
    embeddings.FourierEmbedding(dim=8, freqs=(1.0, 2.0, 3.0)).apply({}, jnp.zeros(2))
  with pytest.raises(ValueError, match="freqs is for the 'fourier' embedding"):
    embeddings.time_embedding("positional", 8, freqs=(1.0,) * 4)


def test_cifar10_ddpmpp_has_56m_parameters_and_six_attention_layers():
  """EDM's CIFAR-10 DDPM++ (Karras et al. 2022): about 56M parameters. Shapes only, no allocation."""
  module = nets.get_network("unet_ddpmpp_cifar10")
  shapes = jax.eval_shape(lambda k: nets.init_params(module, k, jnp.zeros((1, 32, 32, 3))),
                          jax.random.key(0))
  count = nets.num_params(shapes)
  assert abs(count - 56e6) / 56e6 < 0.03, count
  paths = {jax.tree_util.keystr(p).split("['SelfAttention")[0]
           for p, _ in jax.tree_util.tree_leaves_with_path(shapes) if "SelfAttention" in str(p)}
  assert len(paths) == 6  # 4 encoder blocks at 16x16, the middle block at 8x8, 1 decoder block at 16x16
  conditional = nets.get_network("unet_ddpmpp_cifar10", num_classes=10)
  shapes_c = jax.eval_shape(lambda k: nets.init_params(conditional, k, jnp.zeros((1, 32, 32, 3))),
                            jax.random.key(0))
  assert nets.num_params(shapes_c) - count == 11 * 128  # the label table, null row included
  digits = nets.get_network("unet_digits8")  # the CPU preset builds on 8x8x1 digits
  shapes_d = jax.eval_shape(lambda k: nets.init_params(digits, k, jnp.zeros((1, 8, 8, 1))),
                            jax.random.key(0))
  assert 0.5e6 < nets.num_params(shapes_d) < 2e6


def test_imagenet64_adm_has_edms_parameter_count_and_attention_layout():
  """EDM's ImageNet-64 ADM (Karras et al. 2022, Table 7: 295.90M parameters; their label layer
  has no null row: ours adds 768). Shapes only. One head per 64 channels; attention in every
  block at 32, 16 and 8 (decoder included), none at 64."""
  module = nets.get_network("unet_adm_imagenet64", num_classes=1000)
  shapes = jax.eval_shape(lambda k: nets.init_params(module, k, jnp.zeros((1, 64, 64, 3))),
                          jax.random.key(0))
  assert round((nets.num_params(shapes) - 768) / 1e4) == 29590
  attn = [p for p, _ in jax.tree_util.tree_leaves_with_path(shapes)
          if "SelfAttention" in str(p) and "Conv_0" in str(p) and "kernel" in str(p)]
  # encoder 3 x 3 levels, the middle's in0, decoder 4 x 3 levels (num_blocks + 1 each)
  assert len(attn) == 9 + 1 + 12
  with pytest.raises(ValueError, match="layout must be one of"):
    nets.get_network("unet", layout="adm2").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                                                 jnp.zeros((1,)))


def test_extra_conditioning_starts_as_the_source_network_then_depends_on_its_input():
  # A student with an extra scalar input r, initialized from a teacher without it, computes the
  # teacher's function at init (zero-initialized projection) and learns to use r.
  x = jax.random.normal(jax.random.key(0), (4, 3))
  t = jnp.linspace(0.1, 0.9, 4)
  teacher = nets.get_network("mlp", features=16, num_blocks=1, emb_dim=16)
  student = nets.get_network("mlp", features=16, num_blocks=1, emb_dim=16, extra_cond=("r",))
  tp = nets.init_params(teacher, jax.random.key(1), x)
  sp = nets.init_from(nets.init_params(student, jax.random.key(2), x), tp)
  # make the teacher's output non-trivial (the output layer starts at zero)
  leaves, treedef = jax.tree.flatten(tp)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  tp = jax.tree.unflatten(treedef, [a + 0.3 * jax.random.normal(k, a.shape)
                                    for a, k in zip(leaves, keys)])
  sp = nets.init_from(sp, tp)
  t_apply, s_apply = nets.make_apply(teacher), nets.make_apply(student)
  want = t_apply(tp, x, t)
  for r in (0.0, 0.5):
    np.testing.assert_allclose(s_apply(sp, x, t, r=jnp.full((4,), r)), want, rtol=1e-6, atol=1e-6)
  kernel = sp["ConditionEmbedding_0"]["r_embed"]["kernel"]
  sp["ConditionEmbedding_0"]["r_embed"]["kernel"] = 0.3 * jax.random.normal(jax.random.key(4),
                                                                            kernel.shape)
  a, b = s_apply(sp, x, t, r=jnp.zeros(4)), s_apply(sp, x, t, r=jnp.full((4,), 0.5))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  with pytest.raises(ValueError, match=r"takes the extra inputs \['r'\]"):
    s_apply(sp, x, t)
  with pytest.raises(ValueError, match="the source has"):
    nets.init_from(tp, sp)
