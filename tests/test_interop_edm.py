"""EDM snapshot pickles against a torch reference on random weights (float32, <= 1e-4 relative).

The references are EDM's `SongUNet` (DDPM++ and NCSN++) and ADM `DhariwalUNet` inside
`EDMPrecond`, `VPPrecond` or `VEPrecond`, written here from the architecture of NVlabs/edm
(training/networks.py) with its module names, and pickled the way EDM's
`torch_utils.persistence` writes a snapshot: each network as `_reconstruct_persistent_obj(meta)`
with its module source embedded. The source embedded here would raise if it were ever executed.
"""

import math
import os
import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn, F = torch.nn, torch.nn.functional

from diffdistill import interop, nets, schedules  # noqa: E402

pytestmark = pytest.mark.torch

RES, C = 8, 3
ARCH = dict(model_channels=8, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[4],
            dropout=0.0, augment_dim=2)
# ADM: widths 32, 64, 128 at 8x8, 4x4, 2x2, attention everywhere: 0 heads (EDM: width < 64),
# 1 and 2 heads; the stem is model_channels * channel_mult[0] = 32 wide
ADM_ARCH = dict(model_channels=16, channel_mult=[2, 4, 8], channel_mult_emb=2, num_blocks=1,
                attn_resolutions=[8, 4, 2], dropout=0.0, augment_dim=2)
# NCSN++ as EDM writes it (its VE configuration): Fourier embedding twice as wide, residual
# encoder, FIR resample filter [1, 3, 3, 1]; three levels (8x8, 4x4, 2x2): two residual merges
NCSN_ARCH = dict(model_channels=8, channel_mult=[1, 2, 2], channel_mult_emb=2, num_blocks=1,
                 attn_resolutions=[4], dropout=0.0, augment_dim=2, embedding_type="fourier",
                 channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1])
EMBEDDED_SOURCE = "open('EXECUTED', 'w').close()\nraise SystemExit('the embedded source ran')\n"


def _fake_reconstruct(meta):  # stands for EDM's function at pickling time; never called on load
  raise AssertionError("the loader must not call torch_utils.persistence")


_fake_reconstruct.__module__ = "torch_utils.persistence"
_fake_reconstruct.__qualname__ = _fake_reconstruct.__name__ = "_reconstruct_persistent_obj"


def _init_kwargs(args):
  """A network's constructor arguments, as EDM's persistence records them (`_init_kwargs`)."""
  return {k: v for k, v in args.items() if k not in ("self", "__class__")}


class PersistentMixin:
  """EDM's persistent_class.__reduce__: the object's state plus its module's source code."""

  def __reduce__(self):
    fields = list(super().__reduce__()) + [None] * 3
    meta = dict(type="class", version=6, module_src=EMBEDDED_SOURCE, class_name=type(self).__name__,
                state=fields[2])
    return (_fake_reconstruct, (meta,), None)


class Conv2d(PersistentMixin, tnn.Module):
  """EDM's Conv2d: optional up/down-sampling by the separable filter outer(f, f) / sum(f)^2, and
  the fused form (conv padded by both, then the strided filter) of NCSN++'s residual encoder."""

  def __init__(self, cin, cout, kernel, up=False, down=False, resample_filter=(1, 1), fused=False):
    super().__init__()
    self.up, self.down, self.fused = up, down, fused
    self.weight = tnn.Parameter(torch.randn(cout, cin, kernel, kernel)) if kernel else None
    self.bias = tnn.Parameter(torch.randn(cout)) if kernel else None
    f = torch.tensor(resample_filter, dtype=torch.float32)
    self.register_buffer("resample_filter", (f.ger(f)[None, None] / f.sum() ** 2) if up or down else None)

  def forward(self, x):
    f = self.resample_filter
    w_pad = self.weight.shape[-1] // 2 if self.weight is not None else 0
    f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
    if self.fused and self.down:
      x = F.conv2d(x, self.weight, padding=w_pad + f_pad)
      x = F.conv2d(x, f.tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2)
      return x + self.bias.reshape(1, -1, 1, 1)
    if self.up:
      x = F.conv_transpose2d(x, (f * 4).tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2,
                             padding=f_pad)
    if self.down:
      x = F.conv2d(x, f.tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2, padding=f_pad)
    if self.weight is not None:
      x = F.conv2d(x, self.weight, padding=w_pad) + self.bias.reshape(1, -1, 1, 1)
    return x


class Linear(PersistentMixin, tnn.Module):
  def __init__(self, cin, cout, bias=True):
    super().__init__()
    self.weight = tnn.Parameter(torch.randn(cout, cin))
    self.bias = tnn.Parameter(torch.randn(cout)) if bias else None

  def forward(self, x):
    x = x @ self.weight.t()
    return x + self.bias if self.bias is not None else x


class GroupNorm(PersistentMixin, tnn.Module):
  def __init__(self, c, eps=1e-5):
    super().__init__()
    self.groups, self.eps = min(32, c // 4), eps
    self.weight, self.bias = tnn.Parameter(torch.ones(c)), tnn.Parameter(torch.zeros(c))

  def forward(self, x):
    return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)


class PositionalEmbedding(PersistentMixin, tnn.Module):
  def __init__(self, num_channels, endpoint=False):
    super().__init__()
    self.num_channels, self.endpoint = num_channels, endpoint

  def forward(self, x):
    half = self.num_channels // 2
    freqs = (1 / 10000) ** (torch.arange(half) / (half - (1 if self.endpoint else 0)))
    x = x.ger(freqs)
    return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(PersistentMixin, tnn.Module):
  """NCSN++'s embedding: random frequencies N(0, 16^2) kept as a buffer, [cos, sin]."""

  def __init__(self, num_channels, scale=16):
    super().__init__()
    self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

  def forward(self, x):
    x = x.ger(2 * np.pi * self.freqs)
    return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(PersistentMixin, tnn.Module):
  """SongUNet's block (adm=False) or DhariwalUNet's (scale-shift norm, skip scale 1, eps 1e-5,
  no skip projection when the width is kept, one head per 64 channels)."""

  def __init__(self, cin, cout, emb, up=False, down=False, attention=False, adm=False,
               resample_filter=(1, 1)):
    super().__init__()
    eps = 1e-5 if adm else 1e-6
    self.in_channels, self.adm = cin, adm
    self.heads = (cout // 64 if adm else 1) if attention else 0
    self.norm0 = GroupNorm(cin, eps=eps)
    self.conv0 = Conv2d(cin, cout, 3, up=up, down=down, resample_filter=resample_filter)
    self.affine = Linear(emb, 2 * cout if adm else cout)
    self.norm1 = GroupNorm(cout, eps=eps)
    self.conv1 = Conv2d(cout, cout, 3)
    self.skip = None
    if cin != cout or up or down:
      self.skip = Conv2d(cin, cout, 1 if (cin != cout or not adm) else 0, up=up, down=down,
                         resample_filter=resample_filter)
    if self.heads:
      self.norm2 = GroupNorm(cout, eps=eps)
      self.qkv = Conv2d(cout, 3 * cout, 1)
      self.proj = Conv2d(cout, cout, 1)

  def forward(self, x, emb):
    orig, skip_scale = x, 1.0 if self.adm else math.sqrt(0.5)
    x = self.conv0(F.silu(self.norm0(x)))
    p = self.affine(emb)[:, :, None, None]
    if self.adm:
      scale, shift = p.chunk(2, dim=1)
      x = F.silu(shift + self.norm1(x) * (scale + 1))
    else:
      x = F.silu(self.norm1(x + p))
    x = (self.conv1(x) + (self.skip(orig) if self.skip is not None else orig)) * skip_scale
    if self.heads:
      b, c = x.shape[:2]
      q, k, v = self.qkv(self.norm2(x)).reshape(b * self.heads, c // self.heads, 3, -1).unbind(2)
      w = torch.softmax(torch.einsum("ncq,nck->nqk", q, k / math.sqrt(q.shape[1])), dim=2)
      x = (self.proj(torch.einsum("nqk,nck->ncq", w, v).reshape(*x.shape)) + x) * skip_scale
    return x


class SongUNet(PersistentMixin, tnn.Module):
  """DDPM++ (positional embedding, standard encoder, filter [1, 1]) or NCSN++ (Fourier
  embedding twice as wide, residual encoder, filter [1, 3, 3, 1]); standard decoder; EDM's
  module names."""

  def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
               model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
               attn_resolutions=(16,), dropout=0.1, embedding_type="positional",
               channel_mult_noise=1, encoder_type="standard", resample_filter=(1, 1)):
    super().__init__()
    self._init_kwargs = _init_kwargs(locals())
    emb, noise = model_channels * channel_mult_emb, model_channels * channel_mult_noise
    blk = lambda cin, cout, **kw: UNetBlock(  # noqa: E731
        cin, cout, emb, resample_filter=resample_filter, **kw)
    self.map_noise = (PositionalEmbedding(noise, endpoint=True) if embedding_type == "positional"
                      else FourierEmbedding(noise))
    self.map_label = Linear(label_dim, noise) if label_dim else None
    self.map_augment = Linear(augment_dim, noise, bias=False) if augment_dim else None
    self.map_layer0, self.map_layer1 = Linear(noise, emb), Linear(emb, emb)
    self.enc, self.dec = tnn.ModuleDict(), tnn.ModuleDict()
    cout, caux = in_channels, in_channels
    for level, mult in enumerate(channel_mult):
      res = img_resolution >> level
      if level == 0:
        cin, cout = cout, model_channels
        self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
      else:
        self.enc[f"{res}x{res}_down"] = blk(cout, cout, down=True)
        if encoder_type == "residual":
          self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, fused=True,
                                                         resample_filter=resample_filter)
          caux = cout
      for idx in range(num_blocks):
        cin, cout = cout, model_channels * mult
        self.enc[f"{res}x{res}_block{idx}"] = blk(cin, cout, attention=res in attn_resolutions)
    skips = [b.weight.shape[0] if isinstance(b, Conv2d) else b.conv1.weight.shape[0]
             for name, b in self.enc.items() if "aux" not in name]
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = img_resolution >> level
      if level == len(channel_mult) - 1:
        self.dec[f"{res}x{res}_in0"] = blk(cout, cout, attention=True)
        self.dec[f"{res}x{res}_in1"] = blk(cout, cout)
      else:
        self.dec[f"{res}x{res}_up"] = blk(cout, cout, up=True)
      for idx in range(num_blocks + 1):
        cin, cout = cout + skips.pop(), model_channels * mult
        self.dec[f"{res}x{res}_block{idx}"] = blk(
            cin, cout, attention=idx == num_blocks and res in attn_resolutions)
    self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = GroupNorm(cout, eps=1e-6)
    self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = Conv2d(cout, out_channels, 3)

  def forward(self, x, noise_labels, class_labels):
    emb = self.map_noise(noise_labels)
    emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [sin, cos]
    if self.map_label is not None:
      emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.weight.shape[1]))
    emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
    skips, aux = [], x
    for name, block in self.enc.items():
      if "aux_residual" in name:  # NCSN++'s residual encoder
        x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
        continue
      x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
      skips.append(x)
    tmp = None
    for name, block in self.dec.items():
      if "aux_norm" in name:
        tmp = block(x)
      elif "aux_conv" in name:
        return block(F.silu(tmp))
      else:
        if x.shape[1] != block.in_channels:
          x = torch.cat([x, skips.pop()], dim=1)
        x = block(x, emb)


class DhariwalUNet(PersistentMixin, tnn.Module):
  """ADM as EDM writes it, EDM's module names."""

  def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
               model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
               attn_resolutions=(32, 16, 8), dropout=0.1):
    super().__init__()
    self._init_kwargs = _init_kwargs(locals())
    emb = model_channels * channel_mult_emb
    blk = lambda cin, cout, **kw: UNetBlock(cin, cout, emb, adm=True, **kw)  # noqa: E731
    self.map_noise = PositionalEmbedding(model_channels)
    self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
    self.map_layer0, self.map_layer1 = Linear(model_channels, emb), Linear(emb, emb)
    self.map_label = Linear(label_dim, emb, bias=False) if label_dim else None
    self.enc, self.dec = tnn.ModuleDict(), tnn.ModuleDict()
    cout, widths = in_channels, []
    for level, mult in enumerate(channel_mult):
      res = img_resolution >> level
      if level == 0:
        cin, cout = cout, model_channels * mult
        self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
      else:
        self.enc[f"{res}x{res}_down"] = blk(cout, cout, down=True)
      widths.append(cout)
      for idx in range(num_blocks):
        cin, cout = cout, model_channels * mult
        self.enc[f"{res}x{res}_block{idx}"] = blk(cin, cout, attention=res in attn_resolutions)
        widths.append(cout)
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = img_resolution >> level
      if level == len(channel_mult) - 1:
        self.dec[f"{res}x{res}_in0"] = blk(cout, cout, attention=True)
        self.dec[f"{res}x{res}_in1"] = blk(cout, cout)
      else:
        self.dec[f"{res}x{res}_up"] = blk(cout, cout, up=True)
      for idx in range(num_blocks + 1):
        cin, cout = cout + widths.pop(), model_channels * mult
        self.dec[f"{res}x{res}_block{idx}"] = blk(cin, cout, attention=res in attn_resolutions)
    self.out_norm = GroupNorm(cout)
    self.out_conv = Conv2d(cout, out_channels, 3)

  def forward(self, x, noise_labels, class_labels):
    emb = self.map_layer1(F.silu(self.map_layer0(self.map_noise(noise_labels))))
    if self.map_label is not None:
      emb = emb + self.map_label(class_labels)
    emb = F.silu(emb)
    skips = []
    for block in self.enc.values():
      x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
      skips.append(x)
    for block in self.dec.values():
      if x.shape[1] != block.in_channels:
        x = torch.cat([x, skips.pop()], dim=1)
      x = block(x, emb)
    return self.out_conv(F.silu(self.out_norm(x)))


NETWORKS = {"SongUNet": (SongUNet, ARCH), "DhariwalUNet": (DhariwalUNet, ADM_ARCH)}


class EDMPrecond(PersistentMixin, tnn.Module):
  def __init__(self, label_dim=0, sigma_data=0.5, network="SongUNet", img_channels=C):
    super().__init__()
    self.label_dim, self.sigma_data, self.sigma_min, self.sigma_max = label_dim, sigma_data, 0, float("inf")
    cls, arch = NETWORKS[network]
    self.model = cls(RES, img_channels, img_channels, label_dim=label_dim, **arch)

  def forward(self, x, sigma, class_labels=None):
    sigma, sd = sigma.reshape(-1, 1, 1, 1), self.sigma_data
    if self.label_dim:
      class_labels = torch.zeros([1, self.label_dim]) if class_labels is None else class_labels
    c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in, c_noise = 1 / (sd ** 2 + sigma ** 2).sqrt(), sigma.log() / 4
    return c_skip * x + c_out * self.model(c_in * x, c_noise.flatten(), class_labels)


class VPPrecond(PersistentMixin, tnn.Module):
  """EDM's VP preconditioning (Song et al.'s continuous VP, eps prediction at time (M - 1) t)."""

  def __init__(self, label_dim=0, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5,
               network="SongUNet", img_channels=C):
    super().__init__()
    self.label_dim, self.beta_d, self.beta_min, self.M = label_dim, beta_d, beta_min, M
    self.epsilon_t = epsilon_t
    cls, arch = NETWORKS[network]
    self.model = cls(RES, img_channels, img_channels, label_dim=label_dim, **arch)

  def sigma_inv(self, sigma):
    return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt()
            - self.beta_min) / self.beta_d

  def forward(self, x, sigma, class_labels=None):
    sigma = sigma.reshape(-1, 1, 1, 1)
    c_in, c_noise = 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)
    return x - sigma * self.model(c_in * x, c_noise.flatten(), class_labels)


class VEPrecond(PersistentMixin, tnn.Module):
  """EDM's VE preconditioning (Song et al.'s VE SDE): D = x + sigma F(x, log(sigma / 2))."""

  def __init__(self, label_dim=0, sigma_min=0.02, sigma_max=100.0, network="SongUNet",
               img_channels=C):
    super().__init__()
    self.label_dim, self.sigma_min, self.sigma_max = label_dim, sigma_min, sigma_max
    cls, arch = NETWORKS[network]
    self.model = cls(RES, img_channels, img_channels, label_dim=label_dim, **arch)

  def forward(self, x, sigma, class_labels=None):
    sigma = sigma.reshape(-1, 1, 1, 1)
    if self.label_dim:
      class_labels = torch.zeros([1, self.label_dim]) if class_labels is None else class_labels
    return x + sigma * self.model(x, (0.5 * sigma).log().flatten(), class_labels)


def _snapshot(tmp_path, monkeypatch, *, label_dim=0, seed=0, extra=None, name="edm-tiny.pkl",
              precond=EDMPrecond, network="SongUNet", arch=None, **precond_kwargs):
  persistence = types.ModuleType("torch_utils.persistence")
  persistence._reconstruct_persistent_obj = _fake_reconstruct
  monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
  monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)
  torch.manual_seed(seed)
  if arch is not None:  # another size of the same network (the NETWORKS table's default)
    monkeypatch.setitem(NETWORKS, network, (NETWORKS[network][0], arch))
  net = precond(label_dim=label_dim, network=network, **precond_kwargs)
  with torch.no_grad():  # N(0, 1/fan_in) kernels, N(0, 0.5^2) norms and biases
    for p in net.parameters():
      p.copy_(torch.randn(p.shape) * (1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.5))
  data = dict(ema=net.eval(), loss_fn=None, augment_pipe=None,
              dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", extra=extra))
  path = tmp_path / name
  with open(path, "wb") as f:
    pickle.dump(data, f)
  return net, str(path)


def _raw_and_reference(net, teacher, x, sigma, onehot):
  """(ours, torch's): the preconditioner's D at NHWC x, sigma and one-hot labels (or None)."""
  with torch.no_grad():
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(sigma),
              None if onehot is None else torch.from_numpy(onehot)).numpy().transpose(0, 2, 3, 1)
  cond = {} if onehot is None else dict(class_labels=jnp.asarray(onehot))
  out = jax.jit(teacher.raw)(teacher.params, jnp.asarray(x), jnp.asarray(sigma), **cond)
  return np.asarray(out), ref


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.abs(out - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("network", ["SongUNet", "DhariwalUNet"])
@pytest.mark.parametrize("label_dim", [0, 4])
def test_edm_pickle_matches_the_reference(tmp_path, monkeypatch, label_dim, network):
  net, path = _snapshot(tmp_path, monkeypatch, label_dim=label_dim, network=network)
  monkeypatch.chdir(tmp_path)
  teacher = interop.load(path)
  assert not os.path.exists(tmp_path / "EXECUTED")
  assert teacher.kind == "edm" and isinstance(teacher.schedule, schedules.EDM)
  assert teacher.network.layout == ("adm" if network == "DhariwalUNet" else "ddpmpp")
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, RES, RES, C)).astype(np.float32)
  sigma = np.array([0.002, 1.0, 80.0], np.float32)
  onehot = np.eye(label_dim, dtype=np.float32)[[0, 3]] if label_dim else None
  if label_dim:
    onehot = np.concatenate([onehot, np.zeros((1, label_dim), np.float32)])  # no class: the null label
  out, ref = _raw_and_reference(net, teacher, x, sigma, onehot)
  assert _rel_err(out, ref) <= 1e-4, _rel_err(out, ref)
  # The network alone (D at sigma = 0.002 is c_skip x up to 0.4%): F(c_in x, log(sigma) / 4).
  c_in = (1 / np.sqrt(sigma ** 2 + 0.25))[:, None, None, None]
  with torch.no_grad():
    ref_f = net.model(torch.from_numpy((c_in * x).transpose(0, 3, 1, 2)), torch.from_numpy(np.log(sigma) / 4),
                      None if onehot is None else torch.from_numpy(onehot)).numpy().transpose(0, 2, 3, 1)
  label = {} if onehot is None else dict(label=jnp.array([0, 3, label_dim]))
  f = jax.jit(nets.make_apply(teacher.network))(teacher.params, jnp.asarray(c_in * x),
                                                 jnp.asarray(np.log(sigma) / 4), **label)
  assert _rel_err(f, ref_f) <= 1e-4, _rel_err(f, ref_f)
  x0 = jax.jit(teacher.apply)(teacher.params, jnp.asarray(x), jnp.asarray(sigma), **label)
  assert _rel_err(x0, ref) <= 1e-4


def test_vp_precond_pickle_matches_the_reference(tmp_path, monkeypatch):
  """EDM's VP baseline: raw is VPPrecond.forward on EDM's axis; apply is the eps-kind denoiser
  on the continuous VP with the pickle's betas: apply(x_t, t) = D(x_t / alpha_t; sigma_t/alpha_t)."""
  net, path = _snapshot(tmp_path, monkeypatch, precond=VPPrecond, beta_d=18.0, beta_min=0.2)
  teacher = interop.load(path)
  sch = teacher.schedule
  assert teacher.kind == "eps" and isinstance(sch, schedules.VPLinear)
  assert (sch.beta_min, sch.beta_max, sch.t_min) == pytest.approx((0.2, 18.2, 1e-5))
  rng = np.random.default_rng(2)
  x = rng.standard_normal((3, RES, RES, C)).astype(np.float32) * 3
  sigma = np.array([0.01, 1.0, 50.0], np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(sigma)).numpy()
  ref = ref.transpose(0, 2, 3, 1)
  out = jax.jit(teacher.raw)(teacher.params, jnp.asarray(x), jnp.asarray(sigma))
  assert _rel_err(out, ref) <= 1e-4, _rel_err(out, ref)
  t = jnp.array([1e-3, 0.4, 0.9])
  alpha, sig = (np.asarray(f(t), np.float32) for f in (sch.alpha, sch.sigma))
  x_t = x / np.sqrt(1 + sigma[:, None, None, None] ** 2)
  with torch.no_grad():
    ref_t = net(torch.from_numpy((x_t / alpha[:, None, None, None]).transpose(0, 3, 1, 2)),
                torch.from_numpy(sig / alpha)).numpy().transpose(0, 2, 3, 1)
  out_t = jax.jit(teacher.apply)(teacher.params, jnp.asarray(x_t), t)
  assert _rel_err(out_t, ref_t) <= 1e-4, _rel_err(out_t, ref_t)


@pytest.mark.parametrize("precond,label_dim", [(EDMPrecond, 0), (VEPrecond, 4)])
def test_ncsnpp_pickle_matches_the_reference(tmp_path, monkeypatch, precond, label_dim):
  """EDM's NCSN++ (`--arch=ncsnpp`): under EDMPrecond (EDM's own VE-architecture snapshots) and
  under VEPrecond (the VE baseline: kind eps on schedules.VE with the pickle's sigma range, the
  noise input log(sigma / 2) affine in t, F = -eps)."""
  net, path = _snapshot(tmp_path, monkeypatch, precond=precond, arch=NCSN_ARCH, label_dim=label_dim,
                        **(dict(sigma_min=0.01, sigma_max=50.0) if precond is VEPrecond else {}))
  teacher = interop.load(path)
  module = teacher.network
  assert (module.embedding, module.encoder, module.resample_filter, module.channel_mult_noise) == (
      "fourier", "residual", (1, 3, 3, 1), 2)
  np.testing.assert_array_equal(np.float32(module.fourier_freqs), net.model.map_noise.freqs.numpy())
  rng = np.random.default_rng(3)
  x = rng.standard_normal((3, RES, RES, C)).astype(np.float32) * 2
  sigma = np.array([0.02, 1.0, 40.0], np.float32)
  onehot = np.concatenate([np.eye(label_dim, dtype=np.float32)[[1, 2]],
                           np.zeros((1, label_dim), np.float32)]) if label_dim else None
  out, ref = _raw_and_reference(net, teacher, x, sigma, onehot)
  assert _rel_err(out, ref) <= 1e-4, _rel_err(out, ref)
  # D = x + sigma F is dominated by x at small sigma: compare the network part on its own too
  assert _rel_err(out - x, ref - x) <= 1e-4, _rel_err(out - x, ref - x)
  if precond is VEPrecond:
    sch = teacher.schedule
    assert teacher.kind == "eps" and isinstance(sch, schedules.VE)
    assert (sch.sigma_min, sch.sigma_max, sch.t_min, sch.t_max) == (0.01, 50.0, 0.0, 1.0)
    t = jnp.array([0.0, 0.3, 1.0])
    label = dict(label=jnp.array([1, 2, label_dim]))
    x0 = jax.jit(teacher.apply)(teacher.params, jnp.asarray(x), t, **label)
    with torch.no_grad():
      ref_t = net(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                  torch.from_numpy(np.array(sch.sigma(t))),
                  torch.from_numpy(onehot)).numpy().transpose(0, 2, 3, 1)
    assert _rel_err(np.asarray(x0) - x, ref_t - x) <= 1e-4, _rel_err(np.asarray(x0) - x, ref_t - x)


def test_the_ncsnpp_preset_has_edms_parameter_count():
  """`unet_ncsnpp_cifar10` has the torch reference's NCSN++ parameter count at EDM's CIFAR-10
  size (buffers aside)."""
  arch = dict(model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4,
              attn_resolutions=[16], dropout=0.13, embedding_type="fourier", channel_mult_noise=2,
              encoder_type="residual", resample_filter=[1, 3, 3, 1])
  ref = sum(p.numel() for p in SongUNet(32, 3, 3, **arch).parameters())
  module = nets.get_network("unet_ncsnpp_cifar10")
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                          jnp.zeros((1,)))
  assert sum(math.prod(a.shape) for a in jax.tree.leaves(shapes)) == ref


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch EVIL",))


def test_edm_pickle_runs_no_embedded_code_and_refuses_other_networks(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _, path = _snapshot(tmp_path, monkeypatch, extra=_Evil())
  interop.load(path)
  assert not os.path.exists(tmp_path / "EVIL") and not os.path.exists(tmp_path / "EXECUTED")
  net, _ = _snapshot(tmp_path, monkeypatch)
  net.__class__ = type("iDDPMPrecond", (EDMPrecond,), {})
  with open(tmp_path / "iddpm.pkl", "wb") as f:
    pickle.dump(dict(ema=net), f)
  with pytest.raises(ValueError, match="found 'iDDPMPrecond'"):
    interop.load(str(tmp_path / "iddpm.pkl"))
  net.__class__ = EDMPrecond
  net.model.__class__ = type("NCSNpp", (SongUNet,), {})
  with open(tmp_path / "other.pkl", "wb") as f:
    pickle.dump(dict(ema=net), f)
  with pytest.raises(ValueError, match="wraps 'NCSNpp'"):
    interop.load(str(tmp_path / "other.pkl"))
  _, skip = _snapshot(tmp_path, monkeypatch, arch=dict(NCSN_ARCH, encoder_type="skip"),
                      name="skip.pkl")
  with pytest.raises(ValueError, match=r"SongUNet encoder_type='skip' is not supported \(accepted"):
    interop.load(skip)
  net.model.__class__ = SongUNet
  net.__class__ = EDMPrecond
  del net.model.dec["4x4_in1"]
  with open(tmp_path / "bad.pkl", "wb") as f:
    pickle.dump(dict(ema=net), f)
  with pytest.raises(ValueError, match=r"missing key 'model\.dec\.4x4_in1\.norm0\.weight'"):
    interop.load(str(tmp_path / "bad.pkl"))


@pytest.mark.parametrize("precond", ["EDMPrecond",
                                     pytest.param("VEPrecond", marks=pytest.mark.slow)])
def test_an_edm_snapshot_is_distilled_end_to_end(tmp_path, monkeypatch, precond):
  """`--config.teacher.kind=import` on an EDM snapshot (DDPM++ under EDMPrecond; NCSN++ under
  VEPrecond, slow: the same pipeline on another schedule): ECT from the snapshot's weights, on its
  own samples, a few steps (tiny); the student at the teacher's weights is the teacher."""
  from diffdistill.methods import _common
  from experiments.distill import config as config_lib, main as main_lib, setup as setup_lib
  ve = precond == "VEPrecond"
  _, path = _snapshot(tmp_path, monkeypatch,
                      **(dict(precond=VEPrecond, arch=NCSN_ARCH) if ve else {}))
  config = config_lib.get_config("ect_import,tiny")
  config.teacher.path = path
  setup = setup_lib.make_setup(config)
  assert setup.teacher.example_shape == (RES, RES, C)
  assert setup.teacher.kind == ("eps" if ve else "edm")
  x = jax.random.normal(jax.random.key(0), (2, RES, RES, C))
  t = jnp.array([0.1, 0.9]) if ve else jnp.array([0.5, 20.0])
  np.testing.assert_allclose(_common.student_net(config, setup).denoise(setup.teacher.params, x, t),
                             setup.teacher.apply(setup.teacher.params, x, t), rtol=1e-6, atol=1e-6)
  out = main_lib.run(config, str(tmp_path / "run"))
  rows = [r for r in out["rows"] if r["method"] == "ect"]
  assert rows and all(np.isfinite(r["median"]) and not r["nan"] for r in out["rows"])
  assert np.load(tmp_path / "run" / "samples" / "ect_nfe1.npz")["samples"].shape == (128, RES, RES, C)
