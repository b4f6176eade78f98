"""The Flax FID Inception against pytorch-fid's own torch code, with random weights written here.

pytorch-fid's `fid_inception_v3()` builds the network (its FID blocks) and then loads the weight
file it downloads; here its `load_state_dict` is skipped while building, every parameter and
buffer is randomized, the state dict is saved to tmp_path (the format of pt_inception-*.pth), and
pytorch-fid's `InceptionV3` wrapper (resize, normalisation, pool3) is built from that file.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from diffdistill.nets import inception

from torch_imports import import_torchvision


def _relative(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
  torch = pytest.importorskip("torch")
  torchvision = import_torchvision()
  pfi = pytest.importorskip("pytorch_fid.inception")
  mp = pytest.MonkeyPatch()
  mp.setattr(torchvision.models.Inception3, "load_state_dict", lambda self, *a, **k: None)
  mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: None)
  net = pfi.fid_inception_v3()
  mp.undo()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.endswith("conv.weight") or name == "fc.weight":
        fan_in = int(np.prod(p.shape[1:]))  # He scale keeps activations O(1) through 94 convs
        p.copy_(torch.randn(p.shape, generator=gen) * np.sqrt(2.0 / fan_in))
      elif name.endswith("bn.weight"):
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
      else:  # bn.bias, fc.bias
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for name, b in net.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=gen))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=gen))
  path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-random.pth"
  torch.save(net.state_dict(), path)
  mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: torch.load(path))
  wrapper = pfi.InceptionV3([3]).eval()  # pytorch-fid's FID feature extractor
  mp.undo()
  net.eval()
  return torch, wrapper, net, path


@pytest.fixture(scope="module")
def flax_variables(torch_reference):
  return inception.load_inception(str(torch_reference[3]))


@pytest.mark.torch
@pytest.mark.parametrize("size", [32, 64, 299])
def test_pool3_and_logits_match_pytorch_fid(torch_reference, flax_variables, size):
  torch, wrapper, net, _ = torch_reference
  images = np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  x01 = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
  with torch.no_grad():
    ref_pool = wrapper(x01)[0][:, :, 0, 0]
    # Inception3's last layer without its bias (the IS's logits; nets/inception.py docstring)
    ref_logits = (ref_pool @ net.fc.weight.T).numpy()
    ref_pool = ref_pool.numpy()
  pool, logits = inception.inception_features(flax_variables, images)
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert np.std(ref_pool) > 1e-2  # the random network does not collapse
  assert _relative(pool, ref_pool) < 1e-4
  assert _relative(logits, ref_logits) < 1e-4
  # The same images as floats in [-1, 1] give the same features.
  pool_f, _ = inception.inception_features(flax_variables, images.astype(np.float32) / 127.5 - 1.0)
  assert _relative(pool_f, ref_pool) < 1e-4


@pytest.mark.torch
def test_npz_conversion_gives_the_same_network(torch_reference, flax_variables, tmp_path):
  npz = tmp_path / "inception.npz"
  inception.convert_to_npz(str(torch_reference[3]), str(npz))
  from_npz = inception.load_inception(str(npz))
  jax.tree.map(np.testing.assert_array_equal, from_npz, flax_variables)


@pytest.mark.torch
def test_resize_matches_torch_interpolate(torch_reference):
  torch = torch_reference[0]
  x = np.random.default_rng(0).uniform(-1, 1, (1, 37, 411, 3)).astype(np.float32)  # up and down
  ref = torch.nn.functional.interpolate(torch.from_numpy((x.transpose(0, 3, 1, 2) + 1) / 2),
                                        size=(299, 299), mode="bilinear", align_corners=False)
  ours = inception.preprocess(jnp.asarray(x))
  np.testing.assert_allclose(ours, 2 * ref.numpy().transpose(0, 2, 3, 1) - 1, atol=1e-5)


@pytest.fixture(scope="module")
def nvidia_reference(tmp_path_factory):
  """The stand-in for NVIDIA's TorchScript Inception with random weights, written as the `.pkl`
  (a pickled module) and the `.pt` (torch.jit.save of the scripted module)."""
  torch = pytest.importorskip("torch")
  import pickle  # noqa: PLC0415
  import nvidia_inception_reference as ref  # noqa: PLC0415 (imports torch)
  net = ref.randomize(ref.NvidiaInception())
  folder = tmp_path_factory.mktemp("nvidia")
  with open(folder / "inception-2015-12-05.pkl", "wb") as f:
    pickle.dump(net, f)
  torch.jit.save(torch.jit.script(net), str(folder / "inception-2015-12-05.pt"))
  return torch, net, folder


@pytest.mark.torch
@pytest.mark.parametrize("size", [32, 64, 299])
def test_nvidia_port_matches_its_torchscript(nvidia_reference, size):
  torch, net, folder = nvidia_reference
  variables = inception.load_inception(str(folder / "inception-2015-12-05.pkl"))
  assert inception.port_of(variables) == "nvidia"
  images = np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():  # EDM's FID call and StyleGAN's IS call
    ref_pool = net(nchw, return_features=True).numpy()
    ref_probs = net(nchw, no_output_bias=True).numpy()
  pool, logits = inception.inception_features(variables, images)
  assert np.std(ref_pool) > 1e-2  # the random network does not collapse
  assert _relative(pool, ref_pool) < 1e-4
  assert _relative(jax.nn.softmax(logits, axis=-1), ref_probs) < 1e-4
  pool_f, _ = inception.inception_features(variables, images.astype(np.float32) / 127.5 - 1.0)
  assert _relative(pool_f, ref_pool) < 1e-4


@pytest.mark.torch
def test_nvidia_files_pkl_pt_and_npz_load_the_same(nvidia_reference, tmp_path):
  _, _, folder = nvidia_reference
  from_pkl = inception.load_inception(str(folder / "inception-2015-12-05.pkl"))
  from_pt = inception.load_inception(str(folder / "inception-2015-12-05.pt"))
  npz = tmp_path / "nvidia.npz"
  inception.convert_to_npz(str(folder / "inception-2015-12-05.pkl"), str(npz))
  from_npz = inception.load_inception(str(npz))
  for other in (from_pt, from_npz):
    assert inception.port_of(other) == "nvidia"
    jax.tree.map(np.testing.assert_array_equal, other, from_pkl)


@pytest.mark.torch
def test_check_command_on_the_stand_in(nvidia_reference):
  """`python -m diffdistill.nets.inception check FILE`'s function, on the .pt stand-in."""
  _, _, folder = nvidia_reference
  errors = inception.check_against_torchscript(str(folder / "inception-2015-12-05.pt"), sizes=(48,))
  assert set(errors) == {48} and max(errors[48].values()) < 1e-4


def test_nvidia_state_dict_renaming():
  """Every unit of NVIDIA's names lands on one of ours with its tensor; a missing or an unknown
  tensor is refused by name."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(inception.init_variables, jax.random.key(0))
  ours = inception.state_dict_from_variables(
      jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes))
  nvidia = {"output.weight": ours["fc.weight"], "output.bias": ours["fc.bias"]}
  for theirs, name in inception._nvidia_names().items():
    for a, b in (("weight", "conv.weight"), ("beta", "bn.bias"), ("mean", "bn.running_mean"),
                 ("var", "bn.running_var")):
      nvidia[f"{theirs}.{a}"] = ours[f"{name}.{b}"]
  back = inception.state_dict_from_nvidia(nvidia)
  assert back.keys() == ours.keys()
  for key, value in back.items():
    expected = np.ones_like(value) if key.endswith("bn.weight") else ours[key]
    np.testing.assert_array_equal(value, expected, err_msg=key)
  assert "Mixed_7c.branch3x3dbl_3a.conv.weight" in ours  # the flattened towers of the last block
  np.testing.assert_array_equal(back["Mixed_7c.branch3x3dbl_3a.conv.weight"],
                                nvidia["layers.mixed_10.tower_1_mixed_conv.weight"])
  with pytest.raises(ValueError, match="lack 'layers.mixed_3.tower.conv_2.var'"):
    inception.state_dict_from_nvidia(
        {k: v for k, v in nvidia.items() if k != "layers.mixed_3.tower.conv_2.var"})
  with pytest.raises(ValueError, match="does not know.*layers.extra"):
    inception.state_dict_from_nvidia({**nvidia, "layers.extra.weight": np.zeros(1)})


def test_nvidia_resize_is_tf_legacy_bilinear():
  """Output pixel i samples the input at i * n_in / n_out (TF 1's resize_bilinear), not at
  (i + 0.5) n_in / n_out - 0.5 (torch's align_corners=False), edge pixels repeated."""
  ramp = np.arange(10, dtype=np.float32)
  up = np.asarray(inception._bilinear_matrix(10, 299, half_pixel=False) @ ramp)
  np.testing.assert_allclose(up[:-30], (np.arange(299) * 10 / 299)[:-30], atol=1e-5)
  assert np.all(up[-9:] == 9.0)  # beyond the last pixel: its value
  down = np.asarray(inception._bilinear_matrix(598, 299, half_pixel=False) @ np.arange(598.0))
  np.testing.assert_allclose(down, 2.0 * np.arange(299), atol=1e-4)
  x = np.full((1, 8, 8, 3), 128, np.uint8)
  np.testing.assert_allclose(inception.preprocess(x, port="nvidia"), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="port must be one of"):
    inception.preprocess(x, port="tf")


def test_loader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="github.com/mseitzer/pytorch-fid.*nvidia.com"):
    inception.load_inception(str(tmp_path / "missing.pth"))
  np.savez(tmp_path / "wrong.npz", a=np.zeros(3))
  with pytest.raises(ValueError, match="The Inception weights lack .*pt_inception"):
    inception.load_inception(str(tmp_path / "wrong.npz"))
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    inception.preprocess(jnp.full((1, 8, 8, 3), 2.0))
  with pytest.raises(ValueError, match="NHWC"):
    inception.preprocess(jnp.zeros((1, 3, 8, 8)))


def test_state_dict_round_trip():
  shapes = jax.eval_shape(inception.init_variables, jax.random.key(0))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  sd = inception.state_dict_from_variables(variables)
  assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)  # torch's [O, I, kh, kw]
  assert sd["fc.weight"].shape == (1008, 2048)
  assert "Mixed_7c.branch_pool.bn.running_var" in sd
  jax.tree.map(np.testing.assert_array_equal, inception.variables_from_state_dict(sd), variables)
