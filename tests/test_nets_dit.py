"""Tests for diffdistill/nets/dit.py: shapes, adaLN-Zero init, presets, conditioning, jvp.

Equivalence with the reference implementations (diffusers, the original DiT) is in
tests/test_interop_dit.py (marker `torch`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import nets, parametrization, schedules
from diffdistill.nets import dit

TINY = dict(patch_size=2, hidden_size=16, depth=1, num_heads=2)


def _random_params(module, x, seed=0, scale=0.3):
  shapes = jax.eval_shape(lambda k: nets.init_params(module, k, x), jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


def test_dit_starts_at_zero_and_keeps_the_input_shape():
  """adaLN-Zero: the modulations and the output layer start at zero, so the first output is 0."""
  x = jnp.ones((2, 8, 8, 3))
  module = nets.get_network("dit", **TINY, num_classes=5, learn_sigma=True)
  params = nets.init_params(module, jax.random.key(0), x)
  out = jax.jit(nets.make_apply(module))(params, x, jnp.array([0.1, 0.9]), label=jnp.array([0, 5]))
  assert out.shape == (2, 8, 8, 6) and out.dtype == x.dtype
  np.testing.assert_array_equal(out, 0.0)
  assert np.all(np.asarray(params["blocks_0"]["adaLN_modulation"]["kernel"]) == 0)
  assert np.any(np.asarray(params["blocks_0"]["attn_qkv"]["kernel"]) != 0)


def test_dit_presets_have_the_papers_sizes():
  """DiT-XL/2 on 32x32x4 latents, 1000 classes, learned sigma: 675,129,632 parameters in the
  reference code, of which the 256 x 1152 position embedding (a frozen buffer there, a constant
  here) is 294,912."""
  assert {f"dit_{s}_{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} <= set(nets.NETWORKS)
  x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
  module = nets.get_network("dit_XL_2", num_classes=1000, learn_sigma=True)
  shapes = jax.eval_shape(lambda k: nets.init_params(module, k, x), jax.random.key(0))
  assert nets.num_params(shapes) == 675_129_632 - 256 * 1152
  counts = {}
  for size in ("S", "B", "L"):
    module = nets.get_network(f"dit_{size}_2", num_classes=1000, learn_sigma=True)
    counts[size] = nets.num_params(jax.eval_shape(lambda k: nets.init_params(module, k, x),
                                                  jax.random.key(0)))
  # Peebles & Xie, Table 4 (parameters in millions, rounded): 33, 130, 458.
  np.testing.assert_allclose([counts[s] / 1e6 for s in "SBL"], [33, 130, 458], atol=0.6)


def test_sincos_position_embedding_layout():
  """First half of the channels: sin/cos of the column index; second half: of the row index."""
  d, gh, gw = 16, 3, 5
  pos = dit.sincos_position_embedding(d, gh, gw)
  assert pos.shape == (gh * gw, d)
  w = 1.0 / 10000.0 ** (np.arange(4) / 4)
  i, j = 2, 3  # row 2, column 3 -> token 2 * 5 + 3
  np.testing.assert_allclose(pos[i * gw + j], np.r_[np.sin(j * w), np.cos(j * w),
                                                     np.sin(i * w), np.cos(i * w)], rtol=1e-12)


def test_dit_patches_and_unpatchifies_in_place():
  """With the attention and MLP branches gated off, each output patch depends only on the input
  patch at the same place (patchify and unpatchify agree on the layout)."""
  module = nets.get_network("dit", **TINY)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 8, 8, 3)), jnp.float32)
  params = _random_params(module, x)
  for i in range(TINY["depth"]):  # zero gates: each block is the identity
    kernel = params[f"blocks_{i}"]["adaLN_modulation"]["kernel"]
    params[f"blocks_{i}"]["adaLN_modulation"]["kernel"] = jnp.zeros_like(kernel)
    params[f"blocks_{i}"]["adaLN_modulation"]["bias"] = jnp.zeros_like(kernel[0])
  apply = nets.make_apply(module)
  f = jax.jit(lambda x: apply(params, x, jnp.array([0.3])))  # noqa: E731
  x2 = x.at[:, 2:4, 4:6].add(1.0)  # change one 2x2 patch
  diff = np.abs(np.asarray(f(x2) - f(x)))[0].max(axis=-1)
  changed = diff > 1e-6
  assert changed[2:4, 4:6].all() and changed.sum() == 4


def test_dit_label_null_class_dropout_and_errors():
  module = nets.get_network("dit", **TINY, num_classes=3, class_dropout=1.0)
  x = jnp.ones((2, 4, 4, 2))
  params = _random_params(module, x)
  apply = nets.make_apply(module)
  t = jnp.array([0.2, 0.7])
  null = apply(params, x, t, label=jnp.array([3, 3]))
  assert not np.allclose(apply(params, x, t, label=jnp.array([0, 1])), null, atol=1e-4)
  np.testing.assert_allclose(apply(params, x, t, label=jnp.array([0, 1]),
                                   dropout_rng=jax.random.key(0)), null, atol=1e-6)
  with pytest.raises(ValueError, match="null"):
    apply(params, x, t)
  with pytest.raises(ValueError, match="divisible by patch_size"):
    nets.make_apply(nets.get_network("dit", **TINY))(params, jnp.ones((2, 5, 4, 2)), t)


def test_dit_extra_cond_starts_as_the_base_network():
  """A student with extra_cond=("r",) initialized from the base net computes the same function."""
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, 4, 2)), jnp.float32)
  base = nets.get_network("dit", **TINY)
  student = nets.get_network("dit", **TINY, extra_cond=("r",))
  p_base = _random_params(base, x)
  p_student = nets.init_from(nets.init_params(student, jax.random.key(1), x), p_base)
  t = jnp.array([0.3, 0.8])
  np.testing.assert_allclose(nets.make_apply(student)(p_student, x, t, r=jnp.array([0.1, 0.5])),
                             nets.make_apply(base)(p_base, x, t), atol=1e-6)
  with pytest.raises(ValueError, match="extra"):
    nets.make_apply(student)(p_student, x, t)


def test_dit_is_jvp_able_through_time_and_fits_the_denoiser_contract():
  """sCD / MeanFlow take jvps of the network in t: compare with a central difference."""
  module = nets.get_network("dit", **TINY, time_scale=1.0)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 4, 2)), jnp.float32)
  params = _random_params(module, x, scale=0.1)
  denoise = parametrization.as_denoiser(nets.make_apply(module), kind="flow",
                                        schedule=schedules.get("rectified_flow"))
  t = jnp.array([0.4, 0.6])
  f = jax.jit(lambda t: denoise(params, x, t))  # noqa: E731
  _, tangent = jax.jit(lambda t: jax.jvp(f, (t,), (jnp.ones_like(t),)))(t)
  h = 1e-3
  fd = (f(t + h) - f(t - h)) / (2 * h)
  np.testing.assert_allclose(tangent, fd, rtol=0.02, atol=0.02 * float(jnp.abs(fd).max()))
  assert float(jnp.abs(tangent).max()) > 1e-3



def _reference_attention(q, k, v, *args, **kwargs):
  """softmax(q k^T / sqrt(H)) v in the inputs' dtype ([B, T, N, H]); XLA's
  `jax.nn.dot_product_attention` takes its softmax in float32 whatever the inputs."""
  assert not args and not kwargs
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


def test_attention_jvp_matches_a_float64_reference():
  """The jvp through `jax.nn.dot_product_attention` (XLA's implementation, float32) against the
  jvp of the plain float64 formula, tangents in q, k and v at once."""
  rng = np.random.default_rng(0)
  q, k, v, dq, dk, dv = (rng.standard_normal((2, 5, 2, 8)) for _ in range(6))
  f32 = lambda *a: [jnp.asarray(x, jnp.float32) for x in a]  # noqa: E731
  out, tangent = jax.jvp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
                         f32(q, k, v), f32(dq, dk, dv))
  with jax.enable_x64(True):
    ref_out, ref_tangent = jax.jvp(_reference_attention, (q, k, v), (dq, dk, dv))
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tangent, ref_tangent, rtol=1e-5, atol=1e-5 * np.abs(ref_tangent).max())


def test_dit_jvp_matches_float64_differences(monkeypatch):
  """The jvp that sCD and MeanFlow take, in x and t at once, through every DiT block: against
  float64 central differences at h = 1e-7 (their error, O(h^2) truncation + 1e-16 / h rounding,
  measured 2e-8 of the largest entry; 1e-6 at h = 1e-6), with the float64
  attention formula in place of XLA's float32-softmax one (whose own jvp is the test above)."""
  monkeypatch.setattr(jax.nn, "dot_product_attention", _reference_attention)
  with jax.enable_x64(True):
    module = nets.get_network("dit", **dict(TINY, depth=2), time_scale=1.0, dtype=jnp.float64)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 2)))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _random_params(module, x, scale=0.5))
    apply = nets.make_apply(module)
    f = lambda x, t: apply(params, x, t)  # noqa: E731
    t = jnp.array([0.3, 0.7])
    dx, dt = jnp.asarray(rng.standard_normal(x.shape)), jnp.asarray(rng.standard_normal(2))
    out, tangent = jax.jit(lambda x, t: jax.jvp(f, (x, t), (dx, dt)))(x, t)
    assert out.dtype == tangent.dtype == jnp.float64
    h = 1e-7
    fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
    scale = float(jnp.abs(fd).max())
    assert scale > 1e-2
    np.testing.assert_allclose(tangent, fd, rtol=1e-6, atol=1e-7 * scale)
