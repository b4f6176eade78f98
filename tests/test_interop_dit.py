"""DiT / SiT importers against the reference code on random weights (float32, <= 1e-4 relative).

* diffusers' own DiTTransformer2DModel, small and random, saved with save_pretrained;
* the original DiT / SiT `.pt` format: a torch reference written here from the architecture of
  facebookresearch/DiT's models.py (Peebles & Xie 2023), with its state-dict key names.
Plus the refusals: missing, mis-shaped and unexpected keys, another architecture.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_imports import import_diffusers

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

from diffdistill import interop, schedules  # noqa: E402

pytestmark = pytest.mark.torch

B, C, SIZE, K = 3, 4, 8, 5  # batch, channels, image side, classes (label K is the null class)


def _randomize(model, seed):
  """Every parameter N(0, 1/fan_in) (biases N(0, 0.1^2)): no zero-initialized gate hides a term."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.requires_grad:
        fan_in = p[0].numel() if p.ndim > 1 else 100
        p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
  return model.eval()


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.abs(out - ref).max() / np.abs(ref).max()


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, SIZE, SIZE, C)).astype(np.float32)  # NHWC
  labels = np.array([0, 3, K])  # the last one is the null class
  return x, labels


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------------------------------------
# diffusers DiTTransformer2DModel.
# ---------------------------------------------------------------------------------------------


def _diffusers_dit(tmp_path, *, tied, seed=0, **kw):
  diffusers = import_diffusers()
  cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=2 * C,
             num_layers=2, sample_size=SIZE, patch_size=2, num_embeds_ada_norm=K)
  cfg.update(kw)
  model = _randomize(diffusers.DiTTransformer2DModel(**cfg), seed)
  if tied:  # as in every converted checkpoint: one embedder, copied into each block
    emb = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(emb)
  model.save_pretrained(tmp_path)
  return model


@pytest.mark.parametrize("tied", [True, False])
def test_diffusers_dit_matches_diffusers(tmp_path, tied):
  model = _diffusers_dit(tmp_path, tied=tied)
  teacher = interop.load(tmp_path)
  assert ("cond" in teacher.params) == tied and ("block_1_cond" in teacher.params) == (not tied)
  assert teacher.kind == "eps" and teacher.num_classes == K
  x, labels = _inputs()
  timesteps = np.array([0, 999, 417])
  with torch.no_grad():
    ref = model(_nchw(x), timestep=torch.from_numpy(timesteps),
                class_labels=torch.from_numpy(labels)).sample.numpy().transpose(0, 2, 3, 1)
  out = jax.jit(teacher.raw)(teacher.params, jnp.asarray(x), jnp.asarray(timesteps),
                             class_labels=jnp.asarray(labels))
  assert out.shape == (B, SIZE, SIZE, 2 * C)
  assert _rel_err(out, ref) <= 1e-4, _rel_err(out, ref)


def test_diffusers_dit_refuses_another_size_naming_the_key(tmp_path):
  _diffusers_dit(tmp_path, tied=True)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, num_layers=3)))
  with pytest.raises(ValueError, match=r"missing key 'transformer_blocks\.2\.norm1\.emb\."):
    interop.load(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(config, attention_head_dim=4)))
  with pytest.raises(ValueError, match=r"key 'pos_embed\.proj\.weight' has shape \(16, 4, 2, 2\)"):
    interop.load(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(config, _class_name="UNet2DConditionModel")))
  with pytest.raises(ValueError, match="UNet2DConditionModel.*supported: .DiTTransformer2DModel."):
    interop.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# The original DiT / SiT format: a reference written from the official architecture.
# ---------------------------------------------------------------------------------------------


def _sincos_2d(dim, grid):
  """MAE's 2-D sin-cos table: first half encodes the column (w) index, second half the row."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  enc = lambda pos: np.concatenate([np.sin(np.outer(pos, omega)), np.cos(np.outer(pos, omega))], 1)  # noqa: E731
  return np.concatenate([enc(cols), enc(rows)], axis=1)


class RefTimestepEmbedder(tnn.Module):
  def __init__(self, d):
    super().__init__()
    self.mlp = tnn.Sequential(tnn.Linear(256, d), tnn.SiLU(), tnn.Linear(d, d))

  def forward(self, t):
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class RefLabelEmbedder(tnn.Module):
  def __init__(self, k, d):
    super().__init__()
    self.embedding_table = tnn.Embedding(k + 1, d)

  def forward(self, y):
    return self.embedding_table(y)


class RefAttention(tnn.Module):
  def __init__(self, d, heads):
    super().__init__()
    self.heads = heads
    self.qkv = tnn.Linear(d, 3 * d)
    self.proj = tnn.Linear(d, d)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
    return self.proj((w @ v).transpose(1, 2).reshape(b, n, d))


class RefMlp(tnn.Module):
  def __init__(self, d, hidden):
    super().__init__()
    self.fc1, self.fc2 = tnn.Linear(d, hidden), tnn.Linear(hidden, d)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


class RefBlock(tnn.Module):
  def __init__(self, d, heads):
    super().__init__()
    self.norm1 = tnn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    self.attn = RefAttention(d, heads)
    self.norm2 = tnn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    self.mlp = RefMlp(d, 4 * d)
    self.adaLN_modulation = tnn.Sequential(tnn.SiLU(), tnn.Linear(d, 6 * d))

  def forward(self, x, c):
    s1, g1, a1, s2, g2, a2 = self.adaLN_modulation(c).chunk(6, dim=1)  # shift, scale, gate
    x = x + a1[:, None] * self.attn(_modulate(self.norm1(x), s1, g1))
    return x + a2[:, None] * self.mlp(_modulate(self.norm2(x), s2, g2))


class RefFinalLayer(tnn.Module):
  def __init__(self, d, p, out):
    super().__init__()
    self.norm_final = tnn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    self.linear = tnn.Linear(d, p * p * out)
    self.adaLN_modulation = tnn.Sequential(tnn.SiLU(), tnn.Linear(d, 2 * d))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(_modulate(self.norm_final(x), shift, scale))


class RefPatchEmbed(tnn.Module):
  def __init__(self, c, d, p):
    super().__init__()
    self.proj = tnn.Conv2d(c, d, p, stride=p)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)  # [B, T, D], tokens row-major


class RefDiT(tnn.Module):
  """DiT (Peebles & Xie 2023) with the official module names; learn_sigma; SiT halves the output."""

  def __init__(self, *, d=32, depth=2, heads=4, p=2, sit=False):
    super().__init__()
    self.p, self.sit = p, sit
    self.x_embedder = RefPatchEmbed(C, d, p)
    self.t_embedder = RefTimestepEmbedder(d)
    self.y_embedder = RefLabelEmbedder(K, d)
    self.pos_embed = tnn.Parameter(torch.zeros(1, (SIZE // p) ** 2, d), requires_grad=False)
    self.blocks = tnn.ModuleList([RefBlock(d, heads) for _ in range(depth)])
    self.final_layer = RefFinalLayer(d, p, 2 * C)
    self.pos_embed.data.copy_(torch.from_numpy(_sincos_2d(d, SIZE // p)).float()[None])

  def forward(self, x, t, y):
    h = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder(y)
    for block in self.blocks:
      h = block(h, c)
    h = self.final_layer(h, c)
    g = SIZE // self.p
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(h.shape[0], g, g, self.p, self.p, 2 * C))
    out = h.reshape(h.shape[0], 2 * C, SIZE, SIZE)
    return out[:, :C] if self.sit else out


def _original(tmp_path, name, *, seed=0, mutate=None, **kw):
  model = _randomize(RefDiT(sit=name.lower().startswith("sit"), **kw), seed)
  state = model.state_dict()
  if mutate:
    mutate(state)
  path = tmp_path / name
  torch.save(state, path)
  return model, str(path)


def test_original_dit_matches_the_reference_and_is_a_ddpm_eps_teacher(tmp_path):
  model, path = _original(tmp_path, "DiT-tiny.pt")
  teacher = interop.load(path, num_heads=4)
  assert teacher.family == "dit" and teacher.kind == "eps" and teacher.info["learn_sigma"]
  x, labels = _inputs(1)
  timesteps = np.array([0, 999, 250])
  with torch.no_grad():
    ref = model(_nchw(x), torch.from_numpy(timesteps), torch.from_numpy(labels)).numpy()
  ref = ref.transpose(0, 2, 3, 1)
  out = jax.jit(teacher.raw)(teacher.params, jnp.asarray(x), jnp.asarray(timesteps),
                             y=jnp.asarray(labels))
  assert _rel_err(out, ref) <= 1e-4, _rel_err(out, ref)
  # The denoiser: step i at t = (i + 1) / 1000, x0 = (x - sqrt(1 - abar_i) eps) / sqrt(abar_i).
  abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[timesteps]
  eps = ref[..., :C]
  expected = (x - np.sqrt(1 - abar)[:, None, None, None] * eps) / np.sqrt(abar)[:, None, None, None]
  x0 = jax.jit(teacher.apply)(teacher.params, jnp.asarray(x), jnp.asarray((timesteps + 1) / 1000.0),
                              label=jnp.asarray(labels))
  assert isinstance(teacher.schedule, schedules.VPDiscrete)
  assert _rel_err(x0, expected) <= 1e-4, _rel_err(x0, expected)


def test_original_sit_matches_the_reference_and_is_a_flow_teacher(tmp_path):
  model, path = _original(tmp_path, "SiT-tiny.pt", seed=1)
  teacher = interop.load(path, num_heads=4)
  assert teacher.family == "sit" and teacher.kind == "flow"
  x, labels = _inputs(2)
  s = np.array([0.05, 0.5, 0.93], np.float32)  # SiT's time: 0 noise, 1 data
  with torch.no_grad():
    ref = model(_nchw(x), torch.from_numpy(s), torch.from_numpy(labels)).numpy().transpose(0, 2, 3, 1)
  out = jax.jit(teacher.raw)(teacher.params, jnp.asarray(x), jnp.asarray(s), y=jnp.asarray(labels))
  assert out.shape == (B, SIZE, SIZE, C)
  assert _rel_err(out, ref) <= 1e-4, _rel_err(out, ref)
  # x_s = s x0 + (1 - s) eps and v = x0 - eps give x0 = x_s + (1 - s) v; library time t = 1 - s.
  expected = x + (1 - s)[:, None, None, None] * ref
  x0 = jax.jit(teacher.apply)(teacher.params, jnp.asarray(x), jnp.asarray(1 - s),
                              label=jnp.asarray(labels))
  assert _rel_err(x0, expected) <= 1e-4, _rel_err(x0, expected)


def _pop(key):
  return lambda state: state.pop(key)


def _reshape(key):
  def mutate(state):
    state[key] = state[key][:-1]
  return mutate


def _add(key):
  def mutate(state):
    state[key] = torch.zeros(3)
  return mutate


@pytest.mark.parametrize("mutate, message", [
    (_pop("blocks.1.mlp.fc2.bias"), r"missing key 'blocks\.1\.mlp\.fc2\.bias'"),
    (_reshape("blocks.0.attn.qkv.weight"), r"key 'blocks\.0\.attn\.qkv\.weight' has shape \(95, 32\)"),
    (_add("blocks.0.attn.q_norm.weight"), r"unexpected key 'blocks\.0\.attn\.q_norm\.weight'"),
    (_pop("x_embedder.proj.weight"), r"missing key 'x_embedder\.proj\.weight'"),
])
def test_original_dit_refusals_name_the_key(tmp_path, mutate, message):
  _, path = _original(tmp_path, "DiT-bad.pt", depth=2, mutate=mutate)
  with pytest.raises(ValueError, match=message):
    interop.load(path, num_heads=4)


def test_another_architecture_is_refused(tmp_path):
  path = tmp_path / "unet.pt"
  torch.save(tnn.Conv2d(3, 8, 3).state_dict(), path)
  with pytest.raises(ValueError, match=r"missing key 'x_embedder\.proj\.weight'"):
    interop.load(str(path))
  with pytest.raises(ValueError, match="not a supported"):
    interop.load(str(tmp_path))


def test_meanflows_student_on_an_imported_sit_starts_as_the_sit(tmp_path):
  """MeanFlow's student on a SiT checkpoint (`meanflow_import`): the SiT is already a rectified
  flow, so no change of schedule; the student is the SiT with an extra input r (read as SiT reads
  t, s = 1 - r) starting at the checkpoint's weights, where its average velocity is the teacher's
  velocity at every (r, t), over all its labels. The guided teacher (w = 2.5 for t <= 0.75, the
  meanflow_imagenet256 table's setting) trains it end to end in the slow paper-tables test
  (`test_runnable_tables_run_tiny_on_a_random_edm_snapshot`, on a SiT and a VAE)."""
  from diffdistill.methods import _common
  from experiments import teachers
  from experiments.distill import config as config_lib, setup as setup_lib
  _, path = _original(tmp_path, "SiT-S-tiny.pt", seed=3, d=384, heads=6, depth=1)
  config = config_lib.get_config("meanflow_import,tiny")
  config.teacher.path = path
  config.teacher.conditional = True
  setup = setup_lib.make_setup(config)
  assert isinstance(setup.teacher.schedule, schedules.RectifiedFlow)
  assert setup.teacher.kind == "flow"
  net = _common.student_net(config, setup)
  u_net = _common.extra_input_net(config, setup, net, ("r",))
  params = teachers.device_params(setup.teacher)
  start = _common.nets.init_from(u_net.init(jax.random.key(0)), params)
  x = jax.random.normal(jax.random.key(1), (2, SIZE, SIZE, C))
  t, r, label = jnp.array([0.4, 0.9]), jnp.array([0.1, 0.3]), jnp.array([2, K])
  x0 = setup.teacher.apply(params, x, t, label=label)  # the flow is (x - x0) / t on RF
  np.testing.assert_allclose(u_net.apply(start, x, t, r=r, label=label),
                             (x - x0) / t[:, None, None, None], rtol=1e-4, atol=1e-4)
  config.teacher.guidance, config.teacher.guidance_t_max = 2.5, 0.75
  guided = setup_lib.make_setup(config).teacher
  assert guided.name.endswith("(guided, w = 2.5 for t in [0, 0.75]) (all 5 classes)")
