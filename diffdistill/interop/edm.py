"""EDM snapshot pickles (`edm-*.pkl`, NVlabs/edm) read without running the code inside them.

EDM's `torch_utils.persistence` pickles each network together with the source code of its module
and rebuilds it, when loaded by `pickle`, by executing that source. Here a restricted unpickler
rebuilds every persistent object as an inert `Persistent(class_name, state)` record (the source
is kept as text and never executed), every other class the pickle names as an inert record too,
and only tensors through torch's own rebuild functions (storages read with
`torch.load(weights_only=True)`). The tensors are then mapped by name onto `nets.UNet`:
EDM's `SongUNet` (DDPM++ or NCSN++, below) is its layout "ddpmpp", EDM's `DhariwalUNet` (the
ADM network of the ImageNet-64 snapshot) its layout "adm". The preconditioner becomes the
schedule and the output kind:

  * `EDMPrecond`: D(x; sigma) = c_skip x + c_out F(c_in x, log(sigma) / 4), c_skip = sd^2 /
    (sigma^2 + sd^2), ..., which is `parametrization`'s kind 'edm' on `schedules.EDM`;
  * `VPPrecond` (EDM's VP baselines, the DDPM++ cont. VP network of Song et al. 2021):
    D(x; sigma) = x - sigma F(x / sqrt(1 + sigma^2), (M - 1) t(sigma)), i.e. F is the eps
    prediction at x_t = alpha x0 + sigma_vp eps on the continuous VP (`schedules.VPLinear` with
    the pickle's beta_min, beta_min + beta_d and epsilon_t): kind 'eps', the network's time
    input t scaled by M - 1 = 999 in its embedding.

  * `VEPrecond` (the VE baseline, Song et al.'s NCSN++ cont. VE): D(x; sigma) = x + sigma
    F(x, log(sigma / 2)) on `schedules.VE(sigma_min, sigma_max, t_min=0, t_max=1)`: F is minus
    the eps prediction (the head conv is negated at import: kind 'eps'), and the noise input
    log(sigma / 2) = log(sigma_min / 2) + t log(sigma_max / sigma_min) is affine in t (the
    network's time input, `interop._network`).

SongUNet comes as DDPM++ or as NCSN++ (`--arch=ncsnpp`: Fourier embedding with the pickle's
frequencies, residual encoder, resample filter [1, 3, 3, 1]; `nets.UNet`'s `embedding`,
`encoder`, `resample_filter`, `fourier_freqs`), under any of the three preconditioners.
`raw(params, x, sigma, class_labels=None)` is the preconditioner's forward on EDM's axis
(x = x0 + sigma n) for all. iDDPMPrecond and the SongUNet variants no EDM snapshot uses ("skip"
encoder or decoder) are refused by name. EDM's class labels are one-hot vectors; the
all-zero vector (no class) is the null class K of the library's label table. The
augmentation-label embedding (`map_augment`, used only when training with EDM's augment pipe;
absent at sampling) is dropped.

References:
  Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models, NeurIPS 2022.
  Song et al., Score-Based Generative Modeling through SDEs, ICLR 2021 (DDPM++, the VP SDE).
  Dhariwal & Nichol, Diffusion Models Beat GANs on Image Synthesis, NeurIPS 2021 (ADM).
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
from diffdistill.interop._network import network_apply

# SongUNet's defaults (NVlabs/edm training/networks.py); the pickle records only the given kwargs.
SONG_UNET_DEFAULTS = dict(augment_dim=0, model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4,
                          num_blocks=4, attn_resolutions=(16,), dropout=0.10, label_dropout=0,
                          embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                          decoder_type="standard", resample_filter=(1, 1))
# the SongUNet variants nets.UNet holds: DDPM++ and NCSN++ (EDM's two; the "skip" encoder and
# decoder of Song et al.'s other NCSN++ configurations are not used by any EDM snapshot)
SUPPORTED = dict(embedding_type=("positional", "fourier"), encoder_type=("standard", "residual"),
                 decoder_type=("standard",))
# DhariwalUNet's defaults (the same file): the ADM network of EDM's ImageNet-64 snapshot
DHARIWAL_UNET_DEFAULTS = dict(augment_dim=0, model_channels=192, channel_mult=(1, 2, 3, 4),
                              channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8),
                              dropout=0.10, label_dropout=0)
ADM_CHANNELS_PER_HEAD = 64  # DhariwalUNet's attention heads: one per 64 channels
NETWORKS = {"SongUNet": ("ddpmpp", SONG_UNET_DEFAULTS),
            "DhariwalUNet": ("adm", DHARIWAL_UNET_DEFAULTS)}
PRECONDITIONERS = ("EDMPrecond", "VPPrecond", "VEPrecond")


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


def _block(k, key, c_in, c_out, emb, *, attention, resample, layout="ddpmpp", heads=1):
  lay = nets.unet.LAYOUTS[layout]
  path = (f"UNetBlock_{k}",)
  leaves = _norm((*path, "GroupNorm_0"), f"{key}.norm0", c_in)
  leaves += _conv((*path, "Conv_0"), f"{key}.conv0", c_out, c_in, 3)
  leaves += ckpt.linear((*path, "Dense_0"), f"{key}.affine",
                        2 * c_out if lay["adaptive_scale"] else c_out, emb)
  leaves += _norm((*path, "GroupNorm_1"), f"{key}.norm1", c_out)
  leaves += _conv((*path, "Conv_1"), f"{key}.conv1", c_out, c_out, 3)
  if c_in != c_out or (resample and lay["resample_proj"]):
    leaves += _conv((*path, "Conv_2"), f"{key}.skip", c_out, c_in, 1)
  if attention and heads:
    a = (*path, "SelfAttention_0")
    leaves += _norm((*a, "GroupNorm_0"), f"{key}.norm2", c_out)
    leaves += [ckpt.Leaf((*a, "Conv_0", "kernel"), (f"{key}.qkv.weight",), ((3 * c_out, c_out, 1, 1),),
                         lambda w: _qkv(w).transpose(2, 3, 1, 0)),
               ckpt.Leaf((*a, "Conv_0", "bias"), (f"{key}.qkv.bias",), ((3 * c_out,),), _qkv)]
    leaves += _conv((*a, "Conv_1"), f"{key}.proj", c_out, c_out, 1)
  return leaves


def unet_leaves(cfg, *, img_resolution, in_channels, out_channels, label_dim, layout="ddpmpp",
                prefix="model."):
  """Every tensor of a SongUNet (DDPM++ layout) or a DhariwalUNet (layout "adm") mapped onto
  nets.UNet's params. The module names are EDM's: enc.{res}x{res}_{conv,down,block<i>},
  dec.{res}x{res}_{in0,in1,up,block<i>}, and the head (SongUNet's dec.*_aux_norm / aux_conv,
  DhariwalUNet's out_norm / out_conv)."""
  adm = layout == "adm"
  mc, mult, n = cfg["model_channels"], tuple(cfg["channel_mult"]), cfg["num_blocks"]
  noise = mc * (1 if adm else cfg["channel_mult_noise"])
  emb = mc * cfg["channel_mult_emb"]
  attn = tuple(cfg["attn_resolutions"])
  heads = lambda c: c // ADM_CHANNELS_PER_HEAD if adm else 1  # noqa: E731
  if adm:  # EDM's embedding is [cos, sin]; nets.embeddings' [sin, cos]: swap map_layer0's inputs
    half = noise // 2
    leaves = [ckpt.Leaf(("ConditionEmbedding_0", "map0", "kernel"), (f"{prefix}map_layer0.weight",),
                        ((emb, noise),), lambda w: np.concatenate([w[:, half:], w[:, :half]], 1).T),
              ckpt.Leaf(("ConditionEmbedding_0", "map0", "bias"), (f"{prefix}map_layer0.bias",),
                        ((emb,),), lambda b: b)]
  else:  # SongUNet swaps them itself
    leaves = ckpt.linear(("ConditionEmbedding_0", "map0"), f"{prefix}map_layer0", emb, noise)
  leaves += ckpt.linear(("ConditionEmbedding_0", "map1"), f"{prefix}map_layer1", emb, emb)
  if label_dim and adm:  # emb += W onehot (no bias; the all-zero row, no class, adds nothing)
    leaves.append(ckpt.Leaf(("ConditionEmbedding_0", "label_embed", "embedding"),
                            (f"{prefix}map_label.weight",), ((emb, label_dim),),
                            lambda w: np.concatenate([w.T, np.zeros((1, emb), w.dtype)], axis=0)))
  elif label_dim:  # e += W (sqrt(K) onehot) + b, before the mapping layers
    scale = math.sqrt(label_dim)
    leaves.append(ckpt.Leaf(("ConditionEmbedding_0", "label_embed", "embedding"),
                            (f"{prefix}map_label.weight", f"{prefix}map_label.bias"),
                            ((noise, label_dim), (noise,)),
                            lambda w, b: np.concatenate([scale * w.T + b, b[None]], axis=0)))

  def block(k, key, cin, cout, **kw):
    return _block(k, key, cin, cout, emb, layout=layout, heads=heads(cout), **kw)

  k, skips, cout, caux = 0, [], in_channels, in_channels
  residual = not adm and cfg["encoder_type"] == "residual"
  for level, m in enumerate(mult):
    res = img_resolution >> level
    if level == 0:
      leaves += _conv(("Conv_0",), f"{prefix}enc.{res}x{res}_conv", mc * (m if adm else 1), cout, 3)
      cout = mc * (m if adm else 1)
    else:
      leaves += block(k, f"{prefix}enc.{res}x{res}_down", cout, cout, attention=False,
                      resample=True)
      k += 1
      if residual:  # NCSN++: the image, filtered down, added after each down-sampling block
        leaves += _conv((f"aux_residual_{level}",), f"{prefix}enc.{res}x{res}_aux_residual", cout,
                        caux, 3)
        caux = cout
    skips.append(cout)
    for idx in range(n):
      cin, cout = cout, mc * m
      leaves += block(k, f"{prefix}enc.{res}x{res}_block{idx}", cin, cout, attention=res in attn,
                      resample=False)
      k += 1
      skips.append(cout)
  for level, m in reversed(list(enumerate(mult))):
    res = img_resolution >> level
    if level == len(mult) - 1:
      leaves += block(k, f"{prefix}dec.{res}x{res}_in0", cout, cout, attention=True, resample=False)
      leaves += block(k + 1, f"{prefix}dec.{res}x{res}_in1", cout, cout, attention=False,
                      resample=False)
      k += 2
    else:
      leaves += block(k, f"{prefix}dec.{res}x{res}_up", cout, cout, attention=False, resample=True)
      k += 1
    for idx in range(n + 1):
      cin, cout = cout + skips.pop(), mc * m
      leaves += block(k, f"{prefix}dec.{res}x{res}_block{idx}", cin, cout,
                      attention=(idx == n or adm) and res in attn, resample=False)
      k += 1
  head = (f"{prefix}out_norm", f"{prefix}out_conv") if adm else (
      f"{prefix}dec.{img_resolution}x{img_resolution}_aux_norm",
      f"{prefix}dec.{img_resolution}x{img_resolution}_aux_conv")
  leaves += _norm(("GroupNorm_0",), head[0], cout)
  leaves += _conv(("Conv_1",), head[1], out_channels, cout, 3)
  return leaves


def _precond(net, path):
  """(schedule, kind, embedding_scale, sigma_data or None, time_map) of a supported
  preconditioner."""
  st = net.state
  if net.class_name == "EDMPrecond":
    sd = float(st.get("sigma_data", 0.5))
    return schedules.EDM(sigma_data=sd), "edm", 1.0, sd, (1.0, 0.0)  # sampling range [0.002, 80]
  if net.class_name == "VEPrecond":
    # D = x + sigma F(x, log(sigma / 2)): F is minus the eps prediction on schedules.VE, whose
    # log sigma(t) = log sigma_min + t log(sigma_max / sigma_min) makes the noise input affine in t
    s_min, s_max = float(st.get("sigma_min", 0.02)), float(st.get("sigma_max", 100.0))
    schedule = schedules.VE(sigma_min=s_min, sigma_max=s_max, t_min=0.0, t_max=1.0)
    return schedule, "eps", 1.0, None, (math.log(s_max / s_min), math.log(s_min / 2.0))
  # VPPrecond: D = x - sigma F(x / sqrt(1 + sigma^2), (M - 1) t(sigma)) on the continuous VP
  # of Song et al. 2021: F is the eps prediction at x_t = alpha x0 + sigma_vp eps, time t
  beta_min, beta_d = float(st.get("beta_min", 0.1)), float(st.get("beta_d", 19.9))
  m, eps_t = int(st.get("M", 1000)), float(st.get("epsilon_t", 1e-5))
  schedule = schedules.VPLinear(beta_min=beta_min, beta_max=beta_min + beta_d, t_min=eps_t,
                                t_max=1.0)
  return schedule, "eps", float(m - 1), None, (1.0, 0.0)


def _song_unet_config(cfg, state, path):
  """Checks a SongUNet's variant and its resample-filter buffers against what nets.UNet holds;
  returns (the nets.UNet keyword arguments it sets, the buffer keys consumed)."""
  for name, accepted in SUPPORTED.items():
    if cfg[name] not in accepted:
      raise ValueError(f"{path}: SongUNet {name}={cfg[name]!r} is not supported (accepted: "
                       f"{accepted}).")
  taps = tuple(int(v) for v in cfg["resample_filter"])
  try:
    nets.unet.check_resample_filter(taps)
  except ValueError as e:
    raise ValueError(f"{path}: SongUNet {e}") from None
  f = np.asarray(taps, np.float64)
  expected = np.outer(f, f) / f.sum() ** 2
  consumed = []
  for key in [k for k in state if k.endswith(".resample_filter")]:
    if state[key].shape[-2:] != expected.shape or not np.allclose(state[key][0, 0], expected):
      raise ValueError(f"{path}: key {key!r} is not the resample filter {list(taps)} of the "
                       f"network's resample_filter.")
    consumed.append(key)
  kw = dict(resample_filter=taps, channel_mult_noise=int(cfg["channel_mult_noise"]),
            encoder=cfg["encoder_type"], embedding=cfg["embedding_type"])
  if cfg["embedding_type"] == "fourier":  # the random frequencies are a buffer: architecture
    key = "model.map_noise.freqs"
    want = (cfg["model_channels"] * cfg["channel_mult_noise"] // 2,)
    if key not in state or state[key].shape != want:
      raise ValueError(f"{path}: the Fourier embedding needs key {key!r} of shape {want}, got "
                       f"{None if key not in state else state[key].shape}.")
    kw["fourier_freqs"] = tuple(float(v) for v in state[key])
    consumed.append(key)
  return kw, consumed


def load_edm(path: str):
  """(module, params, raw, apply, schedule, kind, info, make_net_apply) of an EDM snapshot pickle
  (module docstring)."""
  data = read_pickle(path)
  net = data.get("ema") if isinstance(data, dict) else data
  if not isinstance(net, Persistent) or net.class_name not in PRECONDITIONERS:
    found = net.class_name if isinstance(net, Persistent) else type(net).__name__
    raise ValueError(f"{path}: expected one of the preconditioners {PRECONDITIONERS} (under "
                     f"'ema'), found {found!r}; iDDPMPrecond is not supported.")
  model = (net.state.get("_modules") or {}).get("model")
  if not isinstance(model, Persistent) or model.class_name not in NETWORKS:
    found = model.class_name if isinstance(model, Persistent) else type(model).__name__
    raise ValueError(f"{path}: the {net.class_name} wraps {found!r}; supported: "
                     f"{sorted(NETWORKS)}.")
  layout, defaults = NETWORKS[model.class_name]
  kwargs = dict(model.state.get("_init_kwargs") or {})
  cfg = {**defaults, **kwargs}
  res, cin, cout = kwargs["img_resolution"], kwargs["in_channels"], kwargs["out_channels"]
  label_dim = kwargs.get("label_dim", 0)
  state = state_dict(net)
  ignore = [k for k in state if k.startswith("model.map_augment.")]
  # DhariwalUNet has no variants: SongUNet's defaults (positional embedding, filter [1, 1]) are its
  variant, consumed = _song_unet_config({**SONG_UNET_DEFAULTS, **cfg}, state, path)
  ignore += consumed
  leaves = unet_leaves(cfg, img_resolution=res, in_channels=cin, out_channels=cout,
                       label_dim=label_dim, layout=layout)
  params = ckpt.assemble(state, leaves, ignore=ignore, source=path)
  schedule, kind, emb_scale, sd, time_map = _precond(net, path)
  if net.class_name == "VEPrecond":  # the library's eps is -F: negate the head once, here
    params = {**params, "Conv_1": {n: -v for n, v in params["Conv_1"].items()}}
  module = nets.UNet(model_channels=cfg["model_channels"], channel_mult=tuple(cfg["channel_mult"]),
                     num_blocks=cfg["num_blocks"], attn_resolutions=tuple(cfg["attn_resolutions"]),
                     dropout=cfg["dropout"], channel_mult_emb=cfg["channel_mult_emb"],
                     embedding_scale=emb_scale, num_classes=label_dim, layout=layout,
                     channels_per_head=ADM_CHANNELS_PER_HEAD if layout == "adm" else None,
                     **variant)
  a, b = time_map

  def make_net_apply(m):  # F of the preconditioning: the library's kind (VE: log(sigma / 2))
    return network_apply(m, time_input=lambda t: a * t + b, kind=kind, schedule=schedule)

  denoise = parametrization.as_denoiser(make_net_apply(module), kind=kind, schedule=schedule)

  def apply(params, x, t, *, label=None):
    return denoise(params, x, t, **({} if label is None else dict(label=label)))

  def raw(params, x, sigma, *, class_labels=None):
    """The preconditioner's forward(x, sigma, class_labels): D on EDM's axis x = x0 + sigma n."""
    label = None
    if label_dim:
      if class_labels is None:
        raise ValueError(f"this {net.class_name} is class-conditional: class_labels "
                         f"[B, {label_dim}] needed.")
      onehot = jnp.asarray(class_labels)
      label = jnp.where(onehot.sum(-1) > 0, jnp.argmax(onehot, -1), label_dim)
    sigma = jnp.asarray(sigma, jnp.float32)
    if kind == "edm":
      return apply(params, x, sigma, label=label)
    t = schedule.t_from_logsnr(-2.0 * jnp.log(sigma))
    if net.class_name == "VEPrecond":  # VE: x_t = x at t
      return apply(params, x, t, label=label)
    return apply(params, x / jnp.sqrt(1.0 + sigma ** 2)[:, None, None, None], t, label=label)

  info = dict(format="edm_pkl", precond=net.class_name, network=model.class_name,
              img_resolution=res, in_channels=cin, label_dim=label_dim, sigma_data=sd,
              ignored=sorted(k for k in ignore if "map_augment" in k))
  return module, params, raw, apply, schedule, kind, info, make_net_apply


__all__ = ["load_edm", "read_pickle", "state_dict", "unet_leaves", "RestrictedUnpickler",
           "Record", "Persistent"]
