"""EDM snapshot pickles (`edm-*.pkl`, NVlabs/edm) read without running the code inside them.

EDM's `torch_utils.persistence` pickles each network together with the source code of its module
and rebuilds it, when loaded by `pickle`, by executing that source. Here a restricted unpickler
rebuilds every persistent object as an inert `Persistent(class_name, state)` record (the source
is kept as text and never executed), every other class the pickle names as an inert record too,
and only tensors through torch's own rebuild functions (storages read with
`torch.load(weights_only=True)`). The tensors are then mapped by name onto `nets.UNet`, whose
DDPM++ layout is EDM's `SongUNet` (positional embedding, standard encoder and decoder, resample
filter [1, 1]), and the network is wrapped with EDM's preconditioning (`EDMPrecond`):

    D(x; sigma) = c_skip x + c_out F(c_in x, log(sigma) / 4),  c_skip = sd^2 / (sigma^2 + sd^2), ...

which is `parametrization`'s kind 'edm' on `schedules.EDM`. Supported: `EDMPrecond` around a
`SongUNet` in that layout (the EDM CIFAR-10 and AFHQ / FFHQ 64x64 'ddpmpp' snapshots); other
preconditioners and networks (VPPrecond, VEPrecond, DhariwalUNet, NCSN++'s Fourier / residual
variants) are refused by name. EDM's class labels are one-hot vectors; the all-zero vector (no
class) is the null class K of the library's label table. The augmentation-label embedding
(`map_augment`, used only when training with EDM's augment pipe; absent at sampling) is dropped.

References:
  Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models, NeurIPS 2022.
  Song et al., Score-Based Generative Modeling through SDEs, ICLR 2021 (DDPM++).
"""

from __future__ import annotations

import collections
import copyreg
import io
import math
import pickle

import jax.numpy as jnp
import numpy as np

from diffdistill import nets, parametrization, schedules
from diffdistill.interop import _checkpoint as ckpt

# SongUNet's defaults (NVlabs/edm training/networks.py); the pickle records only the given kwargs.
SONG_UNET_DEFAULTS = dict(augment_dim=0, model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4,
                          num_blocks=4, attn_resolutions=(16,), dropout=0.10, label_dropout=0,
                          embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                          decoder_type="standard", resample_filter=(1, 1))
SUPPORTED = dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                 decoder_type="standard", resample_filter=(1, 1))


class Record:
  """An object of a class named in the pickle, rebuilt without importing or running that class."""

  def __init__(self, *args, **kwargs):
    self.args, self.state = args, None

  def __setstate__(self, state):
    self.state = state


class Persistent(Record):
  """An EDM persistent object: its class name and state; `module_src` is text, never executed."""

  def __init__(self, class_name, state, module_src):
    super().__init__()
    self.class_name, self.state, self.module_src = class_name, state, module_src


class EasyDict(dict):
  """dnnlib's EasyDict (a dict with attribute access) as a plain dict; its items are its state."""

  def __setstate__(self, state):
    del state


def _reconstruct_persistent_obj(meta):
  return Persistent(meta["class_name"], meta["state"], meta.get("module_src"))


class RestrictedUnpickler(pickle.Unpickler):
  """Resolves only tensors (torch's rebuild functions), plain containers and EDM's persistent
  objects; every other global becomes an inert `Record` subclass: nothing in the file runs."""

  def find_class(self, module, name):
    import torch  # reading EDM pickles needs torch (the `torch` extra)

    if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
      return _reconstruct_persistent_obj
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter",
                                             "_rebuild_parameter_with_state"):
      return getattr(torch._utils, name)  # noqa: SLF001 (the functions torch pickles tensors with)
    if (module, name) == ("torch.storage", "_load_from_bytes"):
      return lambda b: torch.load(io.BytesIO(b), weights_only=True)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
      return getattr(torch, name)
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("copyreg", "_reconstructor"):
      return copyreg._reconstructor  # object.__new__ of an inert Record: runs no code of the file
    if (module, name) in (("builtins", "object"), ("builtins", "set"), ("builtins", "frozenset")):
      return {"object": object, "set": set, "frozenset": frozenset}[name]
    if name == "EasyDict":
      return EasyDict
    return type(name, (Record,), {"__module__": f"pickled:{module}"})


def read_pickle(path: str):
  with open(path, "rb") as f:
    return RestrictedUnpickler(f).load()


def state_dict(obj, prefix=""):
  """{dotted name: float32 numpy} of a rebuilt torch module tree (parameters and buffers)."""
  state = obj.state or {}
  out = {}
  for group in ("_parameters", "_buffers"):
    for name, value in (state.get(group) or {}).items():
      if value is not None:
        out[prefix + name] = value.detach().float().numpy()
  for name, child in (state.get("_modules") or {}).items():
    if child is not None:
      out.update(state_dict(child, f"{prefix}{name}."))
  return out


def _conv(path, key, c_out, c_in, k):
  return [ckpt.Leaf((*path, "kernel"), (f"{key}.weight",), ((c_out, c_in, k, k),),
                    lambda w: w.transpose(2, 3, 1, 0)),
          ckpt.Leaf((*path, "bias"), (f"{key}.bias",), ((c_out,),), lambda b: b)]


def _norm(path, key, c):
  return [ckpt.Leaf((*path, "scale"), (f"{key}.weight",), ((c,),), lambda w: w),
          ckpt.Leaf((*path, "bias"), (f"{key}.bias",), ((c,),), lambda b: b)]


def _qkv(w):
  """EDM splits its qkv conv's 3C outputs as (C, 3); nets.UNet as (3, C): reorder the outputs."""
  c3 = w.shape[0]
  return w.reshape(c3 // 3, 3, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def _block(k, key, c_in, c_out, emb, *, attention, resample):
  path = (f"UNetBlock_{k}",)
  leaves = _norm((*path, "GroupNorm_0"), f"{key}.norm0", c_in)
  leaves += _conv((*path, "Conv_0"), f"{key}.conv0", c_out, c_in, 3)
  leaves += ckpt.linear((*path, "Dense_0"), f"{key}.affine", c_out, emb)
  leaves += _norm((*path, "GroupNorm_1"), f"{key}.norm1", c_out)
  leaves += _conv((*path, "Conv_1"), f"{key}.conv1", c_out, c_out, 3)
  if c_in != c_out or resample:
    leaves += _conv((*path, "Conv_2"), f"{key}.skip", c_out, c_in, 1)
  if attention:
    a = (*path, "SelfAttention_0")
    leaves += _norm((*a, "GroupNorm_0"), f"{key}.norm2", c_out)
    leaves += [ckpt.Leaf((*a, "Conv_0", "kernel"), (f"{key}.qkv.weight",), ((3 * c_out, c_out, 1, 1),),
                         lambda w: _qkv(w).transpose(2, 3, 1, 0)),
               ckpt.Leaf((*a, "Conv_0", "bias"), (f"{key}.qkv.bias",), ((3 * c_out,),), _qkv)]
    leaves += _conv((*a, "Conv_1"), f"{key}.proj", c_out, c_out, 1)
  return leaves


def song_unet_leaves(cfg, *, img_resolution, in_channels, out_channels, label_dim, prefix="model."):
  """Every tensor of a SongUNet (DDPM++ layout) mapped onto nets.UNet's params, and the names
  to ignore (the augmentation-label embedding, unused at sampling; the fixed resample filters)."""
  mc, mult, n = cfg["model_channels"], tuple(cfg["channel_mult"]), cfg["num_blocks"]
  noise, emb = mc * cfg["channel_mult_noise"], mc * cfg["channel_mult_emb"]
  attn = tuple(cfg["attn_resolutions"])
  leaves = ckpt.linear(("ConditionEmbedding_0", "map0"), f"{prefix}map_layer0", emb, noise)
  leaves += ckpt.linear(("ConditionEmbedding_0", "map1"), f"{prefix}map_layer1", emb, emb)
  if label_dim:
    scale = math.sqrt(label_dim)
    leaves.append(ckpt.Leaf(("ConditionEmbedding_0", "label_embed", "embedding"),
                            (f"{prefix}map_label.weight", f"{prefix}map_label.bias"),
                            ((noise, label_dim), (noise,)),
                            lambda w, b: np.concatenate([scale * w.T + b, b[None]], axis=0)))
  k, skips, cout = 0, [], in_channels
  for level, m in enumerate(mult):
    res = img_resolution >> level
    if level == 0:
      leaves += _conv(("Conv_0",), f"{prefix}enc.{res}x{res}_conv", mc, cout, 3)
      cout = mc
    else:
      leaves += _block(k, f"{prefix}enc.{res}x{res}_down", cout, cout, emb, attention=False, resample=True)
      k += 1
    skips.append(cout)
    for idx in range(n):
      cin, cout = cout, mc * m
      leaves += _block(k, f"{prefix}enc.{res}x{res}_block{idx}", cin, cout, emb, attention=res in attn,
                       resample=False)
      k += 1
      skips.append(cout)
  for level, m in reversed(list(enumerate(mult))):
    res = img_resolution >> level
    if level == len(mult) - 1:
      leaves += _block(k, f"{prefix}dec.{res}x{res}_in0", cout, cout, emb, attention=True, resample=False)
      leaves += _block(k + 1, f"{prefix}dec.{res}x{res}_in1", cout, cout, emb, attention=False, resample=False)
      k += 2
    else:
      leaves += _block(k, f"{prefix}dec.{res}x{res}_up", cout, cout, emb, attention=False, resample=True)
      k += 1
    for idx in range(n + 1):
      cin, cout = cout + skips.pop(), mc * m
      leaves += _block(k, f"{prefix}dec.{res}x{res}_block{idx}", cin, cout, emb,
                       attention=idx == n and res in attn, resample=False)
      k += 1
  leaves += _norm(("GroupNorm_0",), f"{prefix}dec.{img_resolution}x{img_resolution}_aux_norm", cout)
  leaves += _conv(("Conv_1",), f"{prefix}dec.{img_resolution}x{img_resolution}_aux_conv", out_channels, cout, 3)
  return leaves


def load_edm(path: str):
  """(module, params, raw, apply, schedule, info) of an EDM snapshot pickle (module docstring)."""
  data = read_pickle(path)
  net = data.get("ema") if isinstance(data, dict) else data
  if not isinstance(net, Persistent) or net.class_name != "EDMPrecond":
    found = net.class_name if isinstance(net, Persistent) else type(net).__name__
    raise ValueError(f"{path}: expected an EDMPrecond network (under 'ema'), found {found!r}; "
                     "VPPrecond, VEPrecond and other networks are not supported.")
  model = (net.state.get("_modules") or {}).get("model")
  if not isinstance(model, Persistent) or model.class_name != "SongUNet":
    found = model.class_name if isinstance(model, Persistent) else type(model).__name__
    raise ValueError(f"{path}: the EDMPrecond wraps {found!r}; only 'SongUNet' is supported.")
  kwargs = dict(model.state.get("_init_kwargs") or {})
  cfg = {**SONG_UNET_DEFAULTS, **kwargs}
  for name, value in SUPPORTED.items():
    got = tuple(cfg[name]) if isinstance(value, tuple) else cfg[name]
    if got != value:
      raise ValueError(f"{path}: SongUNet {name}={cfg[name]!r} is not supported (only {value!r}).")
  res, cin, cout = kwargs["img_resolution"], kwargs["in_channels"], kwargs["out_channels"]
  label_dim = kwargs.get("label_dim", 0)
  state = state_dict(net)
  flt = np.array([[0.25, 0.25], [0.25, 0.25]], np.float32)
  ignore = [k for k in state if k.startswith("model.map_augment.")]
  for key in [k for k in state if k.endswith(".resample_filter")]:
    if state[key].shape[-2:] != (2, 2) or not np.allclose(state[key][..., :, :], flt):
      raise ValueError(f"{path}: key {key!r} is not the [1, 1] resample filter.")
    ignore.append(key)
  leaves = song_unet_leaves(cfg, img_resolution=res, in_channels=cin, out_channels=cout, label_dim=label_dim)
  params = ckpt.assemble(state, leaves, ignore=ignore, source=path)
  module = nets.UNet(model_channels=cfg["model_channels"], channel_mult=tuple(cfg["channel_mult"]),
                     num_blocks=cfg["num_blocks"], attn_resolutions=tuple(cfg["attn_resolutions"]),
                     dropout=cfg["dropout"], channel_mult_emb=cfg["channel_mult_emb"],
                     embedding="positional", embedding_scale=1.0, num_classes=label_dim)
  sd = float(net.state.get("sigma_data", 0.5))
  schedule = schedules.EDM(sigma_data=sd)  # EDM's sampling range [0.002, 80]
  net_apply = nets.make_apply(module)  # F of EDM's preconditioning: the library's "edm" kind
  denoise = parametrization.as_denoiser(net_apply, kind="edm", schedule=schedule)

  def apply(params, x, t, *, label=None):
    return denoise(params, x, t, **({} if label is None else dict(label=label)))

  def raw(params, x, sigma, *, class_labels=None):
    label = None
    if label_dim:
      if class_labels is None:
        raise ValueError(f"this EDMPrecond is class-conditional: class_labels [B, {label_dim}] needed.")
      onehot = jnp.asarray(class_labels)
      label = jnp.where(onehot.sum(-1) > 0, jnp.argmax(onehot, -1), label_dim)
    return apply(params, x, jnp.asarray(sigma, jnp.float32), label=label)

  info = dict(format="edm_pkl", img_resolution=res, in_channels=cin, label_dim=label_dim,
              sigma_data=sd, ignored=sorted(k for k in ignore if "map_augment" in k))
  return module, params, raw, apply, schedule, info, net_apply


__all__ = ["load_edm", "read_pickle", "state_dict", "song_unet_leaves", "RestrictedUnpickler",
           "Record", "Persistent"]
