"""Tests of the torch-free checkpoint reader and the torchvision converter.

References are independent: ``torch.save`` writes the files (both on-disk
formats) and ``torch.Tensor.numpy()`` gives the expected arrays; torchvision's
ResNet-50 key names and shapes are written out here from its layout, not
derived from our Flax tree.
"""

import collections
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from cac_jax.models import build_model, convert, torch_pickle

FORMATS = [pytest.param(True, id='zip'), pytest.param(False, id='legacy')]


def _tricky_checkpoint(seed: int) -> dict:
  """Tensors that exercise dtypes, offsets, strides, sharing and nesting."""
  g = torch.Generator().manual_seed(seed)
  base = torch.randn(6, 5, generator=g)
  return {
    'float32': torch.randn(3, 4, 2, 2, generator=g),
    'float64': torch.randn(7, generator=g, dtype=torch.float64),
    'float16': torch.randn(4, 3, generator=g).half(),
    'bfloat16': torch.randn(5, generator=g).bfloat16(),
    'int64': torch.randint(-(10**12), 10**12, (4,), generator=g),
    'int32': torch.randint(-1000, 1000, (2, 3), generator=g, dtype=torch.int32),
    'uint8': torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
    'bool': torch.rand(6, generator=g) > 0.5,
    'scalar': torch.tensor(3.5),
    'num_batches_tracked': torch.tensor(17),
    'transposed': base.t(),  # non-contiguous strides
    'sliced': base[2:5, 1:4],  # storage offset + strides
    'shares_storage': base,  # same storage as the two above
    'expanded': torch.randn(3, 1, generator=g).expand(3, 4),  # stride 0
    'nested': collections.OrderedDict(inner=[torch.arange(5), (torch.ones(2), 'text', 7)]),
  }


def _assert_same(ours, ref, path='root'):
  if isinstance(ref, torch.Tensor):
    expected = ref.float().numpy() if ref.dtype == torch.bfloat16 else ref.numpy()
    got = ours.astype(np.float32) if ref.dtype == torch.bfloat16 else ours
    assert isinstance(ours, np.ndarray), path
    assert got.shape == expected.shape, path
    if ref.dtype != torch.bfloat16:
      assert ours.dtype == expected.dtype, (path, ours.dtype, expected.dtype)
    else:
      assert str(ours.dtype) == 'bfloat16', path
    np.testing.assert_array_equal(got, expected, err_msg=path)
  elif isinstance(ref, dict):
    assert type(ours) is type(ref) and list(ours) == list(ref), path
    for k in ref:
      _assert_same(ours[k], ref[k], f'{path}.{k}')
  elif isinstance(ref, (list, tuple)):
    assert type(ours) is type(ref) and len(ours) == len(ref), path
    for i, (a, b) in enumerate(zip(ours, ref)):
      _assert_same(a, b, f'{path}[{i}]')
  else:
    assert ours == ref, path


@pytest.mark.parametrize('zip_format', FORMATS)
def test_torch_pickle_matches_torch_load(tmp_path, zip_format):
  ref = _tricky_checkpoint(seed=int(zip_format))
  path = tmp_path / 'ckpt.pth'
  torch.save(ref, path, _use_new_zipfile_serialization=zip_format)
  _assert_same(torch_pickle.load(path), ref)


@pytest.mark.parametrize('zip_format', FORMATS)
def test_torch_pickle_reads_a_module_state_dict(tmp_path, zip_format):
  module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  path = tmp_path / 'sd.pth'
  torch.save(module.state_dict(), path, _use_new_zipfile_serialization=zip_format)
  sd = torch_pickle.load_state_dict(path)
  assert list(sd) == list(module.state_dict())
  for k, v in module.state_dict().items():
    np.testing.assert_array_equal(sd[k], v.numpy())


def test_torch_pickle_refuses_foreign_classes_and_garbage(tmp_path):
  path = tmp_path / 'module.pth'
  torch.save(torch.nn.Linear(2, 2), path)  # a whole module, not a state dict
  with pytest.raises(pickle.UnpicklingError, match='Linear'):
    torch_pickle.load(path)
  with pytest.raises(ValueError, match='not a PyTorch checkpoint'):
    torch_pickle.loads(b'hello world' * 10)
  torch.save([torch.ones(2)], tmp_path / 'list.pth')
  with pytest.raises(ValueError, match='state dict'):
    torch_pickle.load_state_dict(tmp_path / 'list.pth')


def _torchvision_resnet50_shapes() -> dict[str, tuple]:
  """Key -> shape of torchvision's resnet50().state_dict(), from its layout."""
  shapes = {'conv1.weight': (64, 3, 7, 7)}

  def bn(prefix, c):
    for leaf in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{prefix}.{leaf}'] = (c,)
    shapes[f'{prefix}.num_batches_tracked'] = ()

  bn('bn1', 64)
  inplanes = 64
  for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
    for b in range(blocks):
      p = f'layer{stage + 1}.{b}'
      shapes[f'{p}.conv1.weight'] = (planes, inplanes, 1, 1)
      bn(f'{p}.bn1', planes)
      shapes[f'{p}.conv2.weight'] = (planes, planes, 3, 3)
      bn(f'{p}.bn2', planes)
      shapes[f'{p}.conv3.weight'] = (planes * 4, planes, 1, 1)
      bn(f'{p}.bn3', planes * 4)
      if b == 0:
        shapes[f'{p}.downsample.0.weight'] = (planes * 4, inplanes, 1, 1)
        bn(f'{p}.downsample.1', planes * 4)
      inplanes = planes * 4
  shapes['fc.weight'] = (1000, 2048)
  shapes['fc.bias'] = (1000,)
  return shapes


def _random_state_dict(shapes, seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    k: (
      np.asarray(rng.integers(0, 100), np.int64).reshape(s)
      if k.endswith('num_batches_tracked')
      else rng.standard_normal(s).astype(np.float32)
    )
    for k, s in shapes.items()
  }


def test_convert_resnet50_maps_every_torchvision_tensor():
  sd = _random_state_dict(_torchvision_resnet50_shapes())
  variables = convert.convert_backbone('resnet50', sd)
  params, stats = variables['params'], variables['batch_stats']
  # 25,557,032 torchvision parameters minus fc (2048 * 1000 + 1000).
  assert convert.count_params(params) == 23_508_032
  np.testing.assert_array_equal(params['conv1']['kernel'], sd['conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
    params['layer3_0']['downsample_0']['kernel'][0, 0],
    sd['layer3.0.downsample.0.weight'][:, :, 0, 0].T,
  )
  np.testing.assert_array_equal(params['layer4_2']['bn3']['scale'], sd['layer4.2.bn3.weight'])
  np.testing.assert_array_equal(params['layer4_2']['bn3']['bias'], sd['layer4.2.bn3.bias'])
  np.testing.assert_array_equal(stats['layer2_3']['bn2']['mean'], sd['layer2.3.bn2.running_mean'])
  np.testing.assert_array_equal(stats['layer2_3']['bn2']['var'], sd['layer2.3.bn2.running_var'])


def test_convert_reports_missing_unknown_and_misshaped_tensors():
  sd = _random_state_dict(_torchvision_resnet50_shapes())
  broken = dict(sd)
  del broken['layer2.1.conv2.weight']
  broken['layer9.0.conv1.weight'] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError) as err:
    convert.convert_backbone('resnet50', broken)
  assert 'layer2.1.conv2.weight' in str(err.value)
  assert 'layer9.0.conv1.weight' in str(err.value)
  misshaped = dict(sd, **{'layer1.0.bn1.weight': np.ones((65,), np.float32)})
  with pytest.raises(ValueError, match=r'layer1\.0\.bn1\.weight'):
    convert.convert_backbone('resnet50', misshaped)
  with pytest.raises(ValueError, match='resnet101'):  # a 50 is not a 101
    convert.convert_backbone('resnet101', sd)
  with pytest.raises(ValueError, match='unknown --arch'):
    convert.convert_backbone('vgg16', sd)


def test_cli_roundtrip_and_merge_into_model(tmp_path):
  """torch.save'd file -> CLI -> msgpack -> load_backbone -> merge_backbone."""
  shapes = _torchvision_resnet50_shapes()
  g = torch.Generator().manual_seed(1)
  # Per-output-channel values broadcast with stride 0 keep the file tiny while
  # still checking the layout change (channel o must land at kernel[..., o]).
  sd = {
    k: (torch.randn((s[0],) + (1,) * (len(s) - 1), generator=g).expand(s) if s else torch.tensor(5))
    for k, s in shapes.items()
  }
  pth = tmp_path / 'resnet50.pth'
  torch.save(sd, pth)
  out = tmp_path / 'r50.msgpack'
  assert convert.main(['--arch', 'resnet50', '--input', str(pth), '--output', str(out)]) == 0
  backbone = convert.load_backbone(out)
  kernel = backbone['params']['layer1_1']['conv2']['kernel']
  assert kernel.shape == (3, 3, 64, 64)
  np.testing.assert_array_equal(
    kernel, np.broadcast_to(sd['layer1.1.conv2.weight'][:, 0, 0, 0].numpy(), kernel.shape)
  )

  cfg = ml_collections.ConfigDict(
    dict(backbone='resnet50', output_stride=16, projector=True, proj_dim=128, dtype='float32')
  )
  model = build_model(cfg, num_classes=21)
  abstract = jax.eval_shape(
    lambda: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)},
      jnp.zeros((1, 64, 64, 3)),
      train=False,
    )
  )
  merged = convert.merge_backbone(abstract, backbone)
  np.testing.assert_array_equal(
    merged['batch_stats']['backbone']['layer4_0']['downsample_1']['var'],
    sd['layer4.0.downsample.1.running_var'].numpy(),
  )
  assert merged['params']['head'] is abstract['params']['head']

  cfg.backbone = 'resnet_tiny'
  tiny = build_model(cfg, num_classes=21)
  tiny_vars = jax.eval_shape(
    lambda: tiny.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)},
      jnp.zeros((1, 64, 64, 3)),
      train=False,
    )
  )
  with pytest.raises(ValueError, match='do not match the model'):
    convert.merge_backbone(tiny_vars, backbone)
  with pytest.raises(FileNotFoundError, match='cac_jax.models.convert'):
    convert.load_backbone(tmp_path / 'absent.msgpack')


def test_torch_key_naming_rule():
  assert (
    convert.torch_key('params', ('layer1_0', 'downsample_0', 'kernel'))
    == 'layer1.0.downsample.0.weight'
  )
  assert (
    convert.torch_key('batch_stats', ('features_2', 'conv_1_1', 'var'))
    == 'features.2.conv.1.1.running_var'
  )
