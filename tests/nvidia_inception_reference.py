"""A torch stand-in for NVIDIA's TorchScript Inception (`inception-2015-12-05.pkl` / `.pt`).

Written here from what is public about that file (EDM's / StyleGAN3's FID code calls it with
uint8 NCHW images and `return_features=True`, IS with `no_output_bias=True`; published
re-implementations that were checked against it give its module scopes and parameter names):
  * each conv + batch-norm unit holds `weight` [O, I, kh, kw], `beta`, `mean`, `var` (no scale),
    eps 1e-3, then ReLU; the stem is `layers.conv` ... `layers.conv_4` with max pools `pool0`,
    `pool1`; the blocks `layers.mixed` ... `layers.mixed_10` keep the TF graph's towers, the last
    two flatten them (`tower_mixed_conv_1`); average pools do not count padding, and the last
    block's pool branch is a max pool; `layers.pool2` averages the 8 x 8 map; `output` is the
    2048 -> 1008 linear layer;
  * the input is resized to 299 x 299 as TF 1's legacy `resize_bilinear`: `grid_sample` over an
    identity `affine_grid` shifted by 1 / size_in - 1 / 299 per axis, border padding, then
    (v - 128) / 128.
The test feeds it random weights; the real file is never needed. It can be scripted
(`torch.jit.script`, the `.pt` format) and pickled as a plain module (the `.pkl` stand-in).
"""

import collections

import torch
import torch.nn.functional as F


class Unit(torch.nn.Module):
  def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=(0, 0)):
    super().__init__()
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    self.stride, self.padding = stride, list(padding)
    self.weight = torch.nn.Parameter(torch.zeros(cout, cin, kh, kw))
    self.beta = torch.nn.Parameter(torch.zeros(cout))
    self.mean = torch.nn.Parameter(torch.zeros(cout))
    self.var = torch.nn.Parameter(torch.ones(cout))

  def forward(self, x):
    x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
    return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def _seq(*units):
  return torch.nn.Sequential(collections.OrderedDict(
      ("conv" if k == 0 else f"conv_{k}", u) for k, u in enumerate(units)))


def _avg_pool():
  return torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class BlockA(torch.nn.Module):
  def __init__(self, cin: int, pool: int):
    super().__init__()
    self.conv = Unit(cin, 64, 1)
    self.tower = _seq(Unit(cin, 48, 1), Unit(48, 64, 5, padding=(2, 2)))
    self.tower_1 = _seq(Unit(cin, 64, 1), Unit(64, 96, 3, padding=(1, 1)),
                        Unit(96, 96, 3, padding=(1, 1)))
    self.tower_2 = torch.nn.Sequential(collections.OrderedDict(
        [("pool", _avg_pool()), ("conv", Unit(cin, pool, 1))]))

  def forward(self, x):
    return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockB(torch.nn.Module):
  def __init__(self, cin: int):
    super().__init__()
    self.conv = Unit(cin, 384, 3, stride=2)
    self.tower = _seq(Unit(cin, 64, 1), Unit(64, 96, 3, padding=(1, 1)),
                      Unit(96, 96, 3, stride=2))
    self.pool = torch.nn.MaxPool2d(3, stride=2)

  def forward(self, x):
    return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class BlockC(torch.nn.Module):
  def __init__(self, cin: int, c7: int):
    super().__init__()
    self.conv = Unit(cin, 192, 1)
    self.tower = _seq(Unit(cin, c7, 1), Unit(c7, c7, (1, 7), padding=(0, 3)),
                      Unit(c7, 192, (7, 1), padding=(3, 0)))
    self.tower_1 = _seq(Unit(cin, c7, 1), Unit(c7, c7, (7, 1), padding=(3, 0)),
                        Unit(c7, c7, (1, 7), padding=(0, 3)), Unit(c7, c7, (7, 1), padding=(3, 0)),
                        Unit(c7, 192, (1, 7), padding=(0, 3)))
    self.tower_2 = torch.nn.Sequential(collections.OrderedDict(
        [("pool", _avg_pool()), ("conv", Unit(cin, 192, 1))]))

  def forward(self, x):
    return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockD(torch.nn.Module):
  def __init__(self, cin: int):
    super().__init__()
    self.tower = _seq(Unit(cin, 192, 1), Unit(192, 320, 3, stride=2))
    self.tower_1 = _seq(Unit(cin, 192, 1), Unit(192, 192, (1, 7), padding=(0, 3)),
                        Unit(192, 192, (7, 1), padding=(3, 0)), Unit(192, 192, 3, stride=2))
    self.pool = torch.nn.MaxPool2d(3, stride=2)

  def forward(self, x):
    return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class BlockE(torch.nn.Module):
  def __init__(self, cin: int, max_pool: bool):
    super().__init__()
    self.conv = Unit(cin, 320, 1)
    self.tower_conv = Unit(cin, 384, 1)
    self.tower_mixed_conv = Unit(384, 384, (1, 3), padding=(0, 1))
    self.tower_mixed_conv_1 = Unit(384, 384, (3, 1), padding=(1, 0))
    self.tower_1_conv = Unit(cin, 448, 1)
    self.tower_1_conv_1 = Unit(448, 384, 3, padding=(1, 1))
    self.tower_1_mixed_conv = Unit(384, 384, (1, 3), padding=(0, 1))
    self.tower_1_mixed_conv_1 = Unit(384, 384, (3, 1), padding=(1, 0))
    self.tower_2_pool = torch.nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg_pool()
    self.tower_2_conv = Unit(cin, 192, 1)

  def forward(self, x):
    a = self.tower_conv(x)
    b = self.tower_1_conv_1(self.tower_1_conv(x))
    return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                      self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                      self.tower_2_conv(self.tower_2_pool(x))], 1)


class NvidiaInception(torch.nn.Module):
  def __init__(self):
    super().__init__()
    layers = [("conv", Unit(3, 32, 3, stride=2)), ("conv_1", Unit(32, 32, 3)),
              ("conv_2", Unit(32, 64, 3, padding=(1, 1))), ("pool0", torch.nn.MaxPool2d(3, 2)),
              ("conv_3", Unit(64, 80, 1)), ("conv_4", Unit(80, 192, 3)),
              ("pool1", torch.nn.MaxPool2d(3, 2)),
              ("mixed", BlockA(192, 32)), ("mixed_1", BlockA(256, 64)),
              ("mixed_2", BlockA(288, 64)), ("mixed_3", BlockB(288)),
              ("mixed_4", BlockC(768, 128)), ("mixed_5", BlockC(768, 160)),
              ("mixed_6", BlockC(768, 160)), ("mixed_7", BlockC(768, 192)),
              ("mixed_8", BlockD(768)), ("mixed_9", BlockE(1280, False)),
              ("mixed_10", BlockE(2048, True)), ("pool2", torch.nn.AvgPool2d(8))]
    self.layers = torch.nn.Sequential(collections.OrderedDict(layers))
    self.output = torch.nn.Linear(2048, 1008)

  def forward(self, img, return_features: bool = False, no_output_bias: bool = False):
    n, c, h, w = img.shape
    x = img.to(torch.float32)
    theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
    theta[:, 0, 2] += 1.0 / w - 1.0 / 299
    theta[:, 1, 2] += 1.0 / h - 1.0 / 299
    grid = F.affine_grid(theta, [n, c, 299, 299], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    features = self.layers((x - 128.0) / 128.0).reshape(n, 2048)
    if return_features:
      return features
    bias = None if no_output_bias else self.output.bias
    return F.softmax(F.linear(features, self.output.weight, bias), dim=1)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """He-scaled conv / output weights, small random shifts and means, variances in [0.5, 1.5]."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("weight"):
        p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
      elif name.endswith("var"):
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
      else:  # beta, mean, output.bias
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  return module.eval()
