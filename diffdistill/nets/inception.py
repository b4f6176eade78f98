"""Inception-v3 for FID: TF's 2015-12-05 graph as pytorch-fid ports it, in Flax.

The network is torchvision's Inception-v3 with pytorch-fid's FID blocks (`FIDInceptionA`, `C`,
`E_1`, `E_2`): every 3x3 average pool inside a block excludes the zero padding from its count
(TF's `AvgPool` with SAME padding), and the last block (Mixed_7c) pools its fourth branch with a
3x3 *max* pool (a quirk of the 2015 graph). Every convolution is conv (no bias) -> batch norm
(eps = 1e-3, running statistics) -> ReLU.

    x [B, H, W, 3] -> preprocess -> [B, 299, 299, 3] in [-1, 1] -> ... -> Mixed_7c [B, 8, 8, 2048]
    pool3 = mean_{h, w} Mixed_7c            [B, 2048]   (FID, precision/recall, KID)
    logits = pool3 W_fc                     [B, 1008]   (Inception Score: softmax of these)

The logits leave out the fc layer's bias, as the Inception Score's original TF code does (it
multiplies pool3 by the softmax layer's weight only; NVIDIA's scripts pass no_output_bias=True to
match it, and torch-fidelity's IS uses its "logits_unbiased"): an IS from biased logits is another
number.

Two ports of the graph are read, and each keeps its own preprocessing (`PORTS`; the loaded
variables say which they are, `port_of`). Inputs are NHWC with 3 channels, either uint8 in [0, 255]
or floating point in [-1, 1] (the library's image convention: the pixel value is 127.5 (x + 1)); a
float input outside [-1, 1] is an error where concrete.
  * "pytorch_fid" (pytorch-fid's exactly): pixels / 255, bilinear resize to 299 x 299 with
    align_corners=False (half-pixel centres) and no antialiasing (`F.interpolate`), then 2x - 1.
  * "nvidia" (NVIDIA's TorchScript translation of the graph, EDM's / StyleGAN's FID detector):
    bilinear resize of the pixels as TF 1's legacy `resize_bilinear` (source coordinate
    i * n_in / n_out, edge pixels repeated; `grid_sample` with a shifted identity grid in their
    code), then (v - 128) / 128. Its batch norms have no scale (1).

Parameters are `{"params": ..., "batch_stats": ...}` with torch's module names (Mixed_5b/branch1x1/
conv/kernel, .../bn/scale, .../bn/mean, ...). Weight files, none downloaded at run time:
  * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a torch state dict; needs torch),
    from https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/;
  * NVIDIA's `inception-2015-12-05.pkl` (StyleGAN3 / EDM; unpickled with torch: a pickle runs
    code, so only a file from NVIDIA) or StyleGAN2-ADA's `inception-2015-12-05.pt` (the same
    TorchScript module, `torch.jit.load`): its parameters (`layers.mixed_9.tower_mixed_conv.weight`,
    `.beta`, `.mean`, `.var`, `output.weight`, ...) renamed to the names below;
  * a `.npz` holding the state dict in pytorch-fid's names as numpy arrays (no torch needed), with
    a `port` entry for NVIDIA's: `python -m diffdistill.nets.inception IN OUT.npz` converts one.

References:
  Szegedy et al., Rethinking the Inception Architecture for Computer Vision, CVPR 2016.
  Heusel et al., GANs Trained by a Two Time-Scale Update Rule (FID), NeurIPS 2017.
  Seitzer, pytorch-fid (https://github.com/mseitzer/pytorch-fid), inception.py.
  Salimans et al., Improved Techniques for Training GANs (Inception Score), NeurIPS 2016.
  Karras et al., StyleGAN2-ADA / EDM code: metrics/frechet_inception_distance.py, fid.py.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
import zipfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
NVIDIA_URL = ("https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/"
              "metrics/inception-2015-12-05.pkl")
PORTS = ("pytorch_fid", "nvidia")
_NVIDIA_MARK = "nvidia_port"  # an empty collection in the variables of NVIDIA's port (no leaves)


class BasicConv(nn.Module):
  """conv (no bias) -> batch norm with running statistics (eps 1e-3) -> ReLU."""

  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    (ph, pw) = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)),
                use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
  """TF's 3x3/1 average pool with SAME padding: the padded zeros are not counted."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (avg-pool branch, padding not counted) and Mixed_7c (max-pool branch)."""

  max_pool_branch: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    if self.max_pool_branch:
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))  # pads with -inf
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """x [B, 299, 299, 3] in [-1, 1] (already preprocessed) -> (pool3 [B, 2048], logits [B, 1008])."""

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(False, name="Mixed_7b")(x)
    x = InceptionE(True, name="Mixed_7c")(x)  # [B, 8, 8, 2048] at 299 x 299
    pool3 = jnp.mean(x, axis=(1, 2))
    return pool3, _Logits(name="fc")(pool3)


class _Logits(nn.Module):
  """pool3 W: the fc layer of the weight files without its bias (kept, unused; module docstring)."""

  @nn.compact
  def __call__(self, pool3: Array) -> Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (NUM_FEATURES, NUM_LOGITS))
    self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
    return jnp.dot(pool3, kernel, precision="highest")


@functools.lru_cache(maxsize=16)
def _bilinear_matrix(n_in: int, n_out: int, half_pixel: bool = True) -> np.ndarray:
  """[n_out, n_in] weights of bilinear interpolation without antialiasing. Source coordinate of
  output i: s = max((i + 0.5) n_in / n_out - 0.5, 0) with half-pixel centres (torch's
  align_corners=False: pytorch-fid), s = i n_in / n_out without (TF 1's legacy resize_bilinear:
  NVIDIA's port); neighbours floor(s) and floor(s) + 1 (clamped to n_in - 1), weights 1 - frac(s)
  and frac(s). Computed in float32 arithmetic as torch does on CPU: in float64 the weights differ
  from torch's by up to 3e-5 at 400 pixels."""
  f32 = np.float32
  scale = f32(n_in) / f32(n_out)
  i = np.arange(n_out, dtype=f32)
  s = np.maximum(scale * (i + f32(0.5)) - f32(0.5), f32(0.0)) if half_pixel else scale * i
  i0 = np.minimum(s.astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = (s - i0.astype(f32)).astype(f32)
  m = np.zeros((n_out, n_in), f32)
  np.add.at(m, (np.arange(n_out), i0), f32(1.0) - w1)
  np.add.at(m, (np.arange(n_out), i1), w1)
  return m


def _check_images(images) -> Array:
  """images as an array: [B, H, W, 3], uint8 or float (in [-1, 1], checked where concrete)."""
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be NHWC RGB, [B, H, W, 3]; got shape {images.shape}.")
  if images.dtype != jnp.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1]; got dtype "
                     f"{images.dtype}.")
  if (jnp.issubdtype(images.dtype, jnp.floating) and images.size
      and not isinstance(images, jax.core.Tracer)):
    lo, hi = float(jnp.min(images)), float(jnp.max(images))
    if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
      raise ValueError(f"float images must lie in [-1, 1] (uint8 images in [0, 255]); got values "
                       f"in [{lo:.4g}, {hi:.4g}].")
  return images


def _check_port(port: str) -> str:
  if port not in PORTS:
    raise ValueError(f"port must be one of {PORTS}; got {port!r}.")
  return port


def _resize(x: Array, half_pixel: bool) -> Array:
  h, w = x.shape[1:3]
  if (h, w) == (INPUT_SIZE, INPUT_SIZE):  # both resizes are the identity at equal size
    return x
  mh = jnp.asarray(_bilinear_matrix(h, INPUT_SIZE, half_pixel), jnp.float32)
  mw = jnp.asarray(_bilinear_matrix(w, INPUT_SIZE, half_pixel), jnp.float32)
  x = jnp.einsum("oh,bhwc->bowc", mh, x, precision="highest")
  return jnp.einsum("pw,bowc->bopc", mw, x, precision="highest")


def preprocess(images: Array, port: str = "pytorch_fid") -> Array:
  """[B, H, W, 3] uint8 in [0, 255] or float in [-1, 1] -> the network's [B, 299, 299, 3] float32
  input, as `port` prepares it (module docstring): pytorch-fid's (pixels / 255, half-pixel
  bilinear resize, 2x - 1) or NVIDIA's (TF's legacy bilinear resize of the pixels, (v - 128) / 128).
  """
  images = _check_images(images)
  if _check_port(port) == "pytorch_fid":
    if images.dtype == jnp.uint8:
      x01 = images.astype(jnp.float32) / 255.0
    else:
      x01 = (images.astype(jnp.float32) + 1.0) / 2.0
    return 2.0 * _resize(x01, half_pixel=True) - 1.0
  if images.dtype == jnp.uint8:
    pixels = images.astype(jnp.float32)
  else:
    pixels = (images.astype(jnp.float32) + 1.0) * 127.5
  return (_resize(pixels, half_pixel=False) - 128.0) / 128.0


def port_of(variables: Any) -> str:
  """The port of these weights: "nvidia" when loaded from NVIDIA's file, else "pytorch_fid"."""
  return "nvidia" if _NVIDIA_MARK in variables else "pytorch_fid"


_MODEL = FIDInceptionV3()
_network = jax.jit(_MODEL.apply)  # one compilation at 299 x 299 serves every input size
_preprocess = jax.jit(preprocess, static_argnames="port")


def inception_features(variables: Any, images: Array) -> tuple[Array, Array]:
  """(pool3 [B, 2048], logits [B, 1008]) of images [B, H, W, 3] (uint8 in [0, 255] or float in
  [-1, 1]), float32, with the preprocessing of the port the variables come from (`port_of`;
  `preprocess`). `variables` from `load_inception`. The network compiles once (at 299 x 299) for
  every input size; the resize compiles per input shape."""
  x = _preprocess(_check_images(images), port=port_of(variables))
  return _network({k: variables[k] for k in ("params", "batch_stats")}, x)


def init_variables(rng: Array) -> Any:
  """Randomly initialized variables (shapes for loaders and tests; not a trained network)."""
  return jax.jit(_MODEL.init)(rng, jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))


def variables_from_state_dict(state_dict: dict[str, np.ndarray]) -> Any:
  """Flax variables from pytorch-fid's state dict (torch names and layouts, as numpy arrays).

  conv.weight [O, I, kh, kw] -> conv/kernel [kh, kw, I, O]; bn.weight/bias/running_mean/running_var
  -> params bn/scale, bn/bias, batch_stats bn/mean, bn/var; fc.weight [1008, 2048] -> fc/kernel
  [2048, 1008]. Every tensor of the network must be present with its shape (num_batches_tracked
  and the unused AuxLogits are ignored).
  """
  shapes = jax.eval_shape(init_variables, jax.random.key(0))
  out: dict[str, dict] = {"params": {}, "batch_stats": {}}

  def put(collection, path, value):
    node = out[collection]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value

  flat = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]:
      flat[(collection,) + tuple(k.key for k in path)] = leaf.shape
  for (collection, *path), shape in flat.items():
    module, leaf = path[:-1], path[-1]
    if module[-1] == "bn":
      suffix = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[leaf]
    else:
      suffix = {"kernel": "weight", "bias": "bias"}[leaf]
    key = ".".join(module + [suffix])
    if key not in state_dict:
      raise ValueError(f"The Inception weights lack {key!r} (is this pytorch-fid's FID Inception, "
                       f"pt_inception-2015-12-05-*.pth?).")
    value = np.asarray(state_dict[key], np.float32)
    if leaf == "kernel" and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif leaf == "kernel":
      value = value.T
    if value.shape != tuple(shape):
      raise ValueError(f"Inception weight {key!r} has shape {value.shape} after conversion; the "
                       f"network needs {tuple(shape)}.")
    put(collection, path, jnp.asarray(value))
  return out


def state_dict_from_variables(variables: Any) -> dict[str, np.ndarray]:
  """The inverse of `variables_from_state_dict`: pytorch-fid's keys and layouts as numpy arrays
  (what `.npz` weight files hold; tests write random weights this way)."""
  sd = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
      *module, name = [k.key for k in path]
      value = np.asarray(leaf, np.float32)
      if module[-1] == "bn":
        suffix = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[name]
      else:
        suffix = {"kernel": "weight", "bias": "bias"}[name]
        if name == "kernel":
          value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      sd[".".join(module + [suffix])] = value
  return sd


def _nvidia_names() -> dict[str, str]:
  """NVIDIA's module paths -> pytorch-fid's, for every conv + batch-norm unit and the output layer.

  NVIDIA's TorchScript keeps the TF graph's scopes: the stem `layers.conv` ... `layers.conv_4`,
  the blocks `layers.mixed` ... `layers.mixed_10` with their towers (`tower.conv_1`; the last two
  blocks flatten theirs into `tower_mixed_conv_1` and the like); pytorch-fid uses torchvision's
  names. Each block's branches are concatenated in the same order in both."""
  names = {f"layers.{a}": b for a, b in [
      ("conv", "Conv2d_1a_3x3"), ("conv_1", "Conv2d_2a_3x3"), ("conv_2", "Conv2d_2b_3x3"),
      ("conv_3", "Conv2d_3b_1x1"), ("conv_4", "Conv2d_4a_3x3")]}
  towers = {
      "A": [("conv", "branch1x1"), ("tower.conv", "branch5x5_1"), ("tower.conv_1", "branch5x5_2"),
            ("tower_1.conv", "branch3x3dbl_1"), ("tower_1.conv_1", "branch3x3dbl_2"),
            ("tower_1.conv_2", "branch3x3dbl_3"), ("tower_2.conv", "branch_pool")],
      "B": [("conv", "branch3x3"), ("tower.conv", "branch3x3dbl_1"),
            ("tower.conv_1", "branch3x3dbl_2"), ("tower.conv_2", "branch3x3dbl_3")],
      "C": [("conv", "branch1x1"), ("tower.conv", "branch7x7_1"), ("tower.conv_1", "branch7x7_2"),
            ("tower.conv_2", "branch7x7_3"), ("tower_2.conv", "branch_pool")]
           + [("tower_1.conv" + ("" if k == 0 else f"_{k}"), f"branch7x7dbl_{k + 1}")
              for k in range(5)],
      "D": [("tower.conv", "branch3x3_1"), ("tower.conv_1", "branch3x3_2")]
           + [("tower_1.conv" + ("" if k == 0 else f"_{k}"), f"branch7x7x3_{k + 1}")
              for k in range(4)],
      "E": [("conv", "branch1x1"), ("tower_conv", "branch3x3_1"),
            ("tower_mixed_conv", "branch3x3_2a"), ("tower_mixed_conv_1", "branch3x3_2b"),
            ("tower_1_conv", "branch3x3dbl_1"), ("tower_1_conv_1", "branch3x3dbl_2"),
            ("tower_1_mixed_conv", "branch3x3dbl_3a"), ("tower_1_mixed_conv_1", "branch3x3dbl_3b"),
            ("tower_2_conv", "branch_pool")]}
  blocks = [("A", "Mixed_5b"), ("A", "Mixed_5c"), ("A", "Mixed_5d"), ("B", "Mixed_6a"),
            ("C", "Mixed_6b"), ("C", "Mixed_6c"), ("C", "Mixed_6d"), ("C", "Mixed_6e"),
            ("D", "Mixed_7a"), ("E", "Mixed_7b"), ("E", "Mixed_7c")]
  for k, (kind, ours) in enumerate(blocks):
    for theirs, branch in towers[kind]:
      names[f"layers.mixed{'' if k == 0 else f'_{k}'}.{theirs}"] = f"{ours}.{branch}"
  return names


def state_dict_from_nvidia(nvidia: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """NVIDIA's TorchScript state dict (`<unit>.weight` conv, `.beta` / `.mean` / `.var` batch norm
  without scale, `output.weight` / `.bias`) in pytorch-fid's names and layouts (the scale set to 1).
  Every key of the file must be used and every unit present."""
  out, used = {}, set()

  def take(key):
    if key not in nvidia:
      raise ValueError(f"NVIDIA's Inception weights lack {key!r} (is this inception-2015-12-05.pkl "
                       f"from {NVIDIA_URL}?).")
    used.add(key)
    return np.asarray(nvidia[key], np.float32)

  for theirs, ours in _nvidia_names().items():
    out[f"{ours}.conv.weight"] = take(f"{theirs}.weight")
    out[f"{ours}.bn.bias"] = take(f"{theirs}.beta")
    out[f"{ours}.bn.running_mean"] = take(f"{theirs}.mean")
    out[f"{ours}.bn.running_var"] = take(f"{theirs}.var")
    out[f"{ours}.bn.weight"] = np.ones_like(out[f"{ours}.bn.bias"])
  out["fc.weight"], out["fc.bias"] = take("output.weight"), take("output.bias")
  unused = sorted(set(nvidia) - used)
  if unused:
    raise ValueError(f"NVIDIA's Inception weights hold tensors this port does not know: "
                     f"{unused[:5]}{' ...' if len(unused) > 5 else ''}.")
  return out


def _import_torch(path: str):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"Reading {path} (a torch file) needs torch (pip install 'diffdistill[torch]'); "
                      f"or convert it once elsewhere with `python -m diffdistill.nets.inception "
                      f"{path} OUT.npz` and load the .npz.") from None
  return torch


def _is_torchscript(path: str) -> bool:
  """A torch.jit.save archive (it holds the module's code), not a torch.save state dict."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any("/code/" in name for name in z.namelist())


def _torch_module(path: str):
  """NVIDIA's network as torch reads it: the `.pkl` unpickled (a TorchScript module in a pickle:
  this runs code, as EDM's fid.py does), a TorchScript `.pt` by torch.jit.load."""
  torch = _import_torch(path)
  if path.endswith(".pkl"):
    with open(path, "rb") as f:
      return pickle.load(f)
  return torch.jit.load(path, map_location="cpu")


def _torch_state_dict(path: str) -> tuple[dict[str, np.ndarray], str]:
  """(state dict as numpy arrays, port) of a torch weight file: pytorch-fid's `.pth` state dict,
  NVIDIA's pickled TorchScript `.pkl` or StyleGAN2-ADA's TorchScript `.pt`."""
  torch = _import_torch(path)
  if path.endswith(".pkl") or _is_torchscript(path):
    module = _torch_module(path)
    sd = module.state_dict() if hasattr(module, "state_dict") else module
  else:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(sd, dict):
    raise ValueError(f"{path} is neither a torch state dict (pytorch-fid's "
                     f"pt_inception-2015-12-05-*.pth) nor NVIDIA's TorchScript Inception; got "
                     f"{type(sd).__name__}.")
  sd = {k: v.detach().cpu().numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  if "output.weight" in sd:  # NVIDIA's names
    return state_dict_from_nvidia(sd), "nvidia"
  return sd, "pytorch_fid"


def _with_port(variables: Any, port: str) -> Any:
  return {**variables, _NVIDIA_MARK: {}} if _check_port(port) == "nvidia" else variables


def load_inception(path: str) -> Any:
  """Flax variables of the FID Inception, marked with their port (`port_of`), from pytorch-fid's
  `.pth`, NVIDIA's `inception-2015-12-05.pkl` / `.pt` (both need torch) or an `.npz` conversion
  (no torch). Nothing is downloaded: a missing file is an error saying where the files come from."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No Inception weight file at {path!r}. Download pytorch-fid's FID Inception weights from "
        f"{PYTORCH_FID_URL} or NVIDIA's (EDM / StyleGAN) from {NVIDIA_URL} (and optionally "
        f"convert either with `python -m diffdistill.nets.inception IN OUT.npz`).")
  if path.endswith(".npz"):
    with np.load(path) as f:
      sd = {k: f[k] for k in f.files if k != "port"}
      port = str(f["port"]) if "port" in f.files else "pytorch_fid"
  elif path.endswith((".pth", ".pt", ".pkl")):
    sd, port = _torch_state_dict(path)
  else:
    raise ValueError(f"Inception weight file {path!r} must end in .pth (pytorch-fid), .pkl / .pt "
                     f"(NVIDIA's TorchScript) or .npz (converted).")
  return _with_port(variables_from_state_dict(sd), port)


def convert_to_npz(src: str, dst: str) -> None:
  """Writes a torch Inception weight file (pytorch-fid's `.pth`, NVIDIA's `.pkl` / `.pt`) as an
  `.npz` in pytorch-fid's keys, with `port` for NVIDIA's (needs torch once)."""
  sd, port = _torch_state_dict(src)
  variables_from_state_dict(sd)  # refuse a file that is not the FID Inception
  np.savez(dst, **sd, **({"port": np.array(port)} if port != "pytorch_fid" else {}))


def check_against_torchscript(path: str, sizes=(32, 64, 299), seed: int = 0) -> dict[int, dict]:
  """Runs NVIDIA's file itself (its TorchScript `forward`, torch on the CPU) and this port on the
  same random uint8 images at each size: {size: {"pool3": relative L2 error of our pool3 to its
  `return_features=True` output, "probs": of softmax(our logits) to its `no_output_bias=True`
  probabilities}}. The check to run once on the real file (the tests run it on a stand-in)."""
  torch = _import_torch(path)
  module = _torch_module(path)
  sd = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
  variables = _with_port(variables_from_state_dict(state_dict_from_nvidia(sd)), "nvidia")
  rng = np.random.default_rng(seed)
  out = {}
  for size in sizes:
    images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
      ref_pool = module(nchw, return_features=True).numpy().astype(np.float64)
      ref_probs = module(nchw, no_output_bias=True).numpy().astype(np.float64)
    pool, logits = inception_features(variables, images)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    out[size] = {"pool3": float(np.linalg.norm(np.asarray(pool) - ref_pool)
                                / np.linalg.norm(ref_pool)),
                 "probs": float(np.linalg.norm(probs - ref_probs) / np.linalg.norm(ref_probs))}
  return out


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "check":
    errors = check_against_torchscript(sys.argv[2])
    for size, e in errors.items():
      print(f"{size} x {size}: pool3 relative error {e['pool3']:.2e}, "
            f"IS probabilities {e['probs']:.2e}")
    worst = max(max(e.values()) for e in errors.values())
    sys.exit(0 if worst < 1e-4 else f"FAILED: the largest relative error is {worst:.2e} (>= 1e-4)")
  if len(sys.argv) != 3:
    sys.exit("usage: python -m diffdistill.nets.inception pt_inception-2015-12-05-*.pth|"
             "inception-2015-12-05.pkl OUT.npz\n"
             "       python -m diffdistill.nets.inception check inception-2015-12-05.pkl")
  convert_to_npz(sys.argv[1], sys.argv[2])
