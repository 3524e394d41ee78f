"""One table per extension point: a new backbone or dataset is one entry plus a config.

The toy backbone and the toy dataset below are registered into their tables
(`cac_jax.backbones`, `cac_jax.datasets`) and nothing else is edited; config
validation, the model builder, the converter and the data layer then know
them. What a backbone does not support (MobileNetV2 at output stride 8) is a
config error that the training command line turns into exit status 2, before
any model is built or anything is written.
"""

import io
import os
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cac_jax import backbones, config_lib, datasets, predict
from cac_jax.data import sources, validate
from cac_jax.models import build_model, builder, convert
from train_utils import REPO, tiny_config

TOY_CLASSES = ('background', 'square', 'disc')
TOY_PALETTE = np.array([[0, 0, 0], [200, 30, 30], [30, 30, 200]], np.uint8)


class ToyBackbone(nn.Module):
  """Two strided convolutions: the smallest module with the backbone contract."""

  output_stride: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    del train  # no BatchNorm
    low = nn.relu(nn.Conv(8, (3, 3), strides=4, dtype=self.dtype, name='low')(x))
    high = nn.Conv(16, (3, 3), strides=self.output_stride // 4, dtype=self.dtype, name='high')(low)
    return {'low': low, 'high': high}


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def toy_source(data_config, split: str) -> sources.Source:
  """Four 32x32 images per split with a square (1) and a disc (2), as PNG bytes."""
  names, palette = sources.classes(data_config)
  rng = np.random.default_rng(['labeled', 'unlabeled', 'val'].index(split))
  ids, images, labels = [], [], []
  yy, xx = np.mgrid[:32, :32]
  for i in range(4):
    label = np.zeros((32, 32), np.uint8)
    label[4:14, 4:14] = 1
    label[(yy - 22) ** 2 + (xx - 22) ** 2 < 36] = 2
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ids.append(f'{split}_{i}')
    images.append(_png(image))
    labels.append(_png(label))
  return sources.Source(
    ids=tuple(ids),
    images=tuple(images),
    labels=None if split == 'unlabeled' else tuple(labels),
    from_files=False,
    num_classes=len(names),
    class_names=names,
    palette=palette,
  )


@pytest.fixture
def toy_backbone(monkeypatch):
  """'toy' in a copy of the backbone table (the original comes back afterwards)."""
  monkeypatch.setattr(backbones, 'BACKBONES', dict(backbones.BACKBONES))
  backbones.register(backbones.Backbone('toy', ToyBackbone, output_strides=(8,)))
  return 'toy'


@pytest.fixture
def toy_dataset(monkeypatch):
  """'toy_shapes' in a copy of the dataset table."""
  monkeypatch.setattr(datasets, 'DATASETS', dict(datasets.DATASETS))
  datasets.register(
    datasets.Dataset(
      'toy_shapes', toy_source, num_classes=3, class_names=TOY_CLASSES, palette=TOY_PALETTE
    )
  )
  return 'toy_shapes'


def _problems(config) -> str:
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config, num_devices=8)
  return str(e.value)


def test_a_registered_backbone_validates_and_builds(toy_backbone):
  config = tiny_config(**{'model.backbone': toy_backbone, 'model.output_stride': 8})
  config_lib.validate(config, num_devices=8)
  model = build_model(config.model, num_classes=config.data.num_classes)
  # Traced, not compiled: compiling the DeepLabv3+ head costs ~20 s on a CPU.
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  assert set(variables['params']['backbone']) == {'low', 'high'}
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, dc_outputs=True), variables, x)
  assert out['logits'].shape == (2, 32, 32, config.data.num_classes)
  assert out['proj8'].shape == (2, 4, 4, config.model.proj_dim)
  # Its table entry says stride 8 only, so validation and the builder refuse 16.
  message = _problems(tiny_config(**{'model.backbone': toy_backbone}))
  assert 'model.output_stride=16 is not supported by toy (it supports 8)' in message
  with pytest.raises(ValueError, match='not supported by toy'):
    builder.build_backbone(toy_backbone, 16)
  # No torchvision checkpoint and no ImageNet weights in its entry.
  assert toy_backbone not in backbones.convertible()
  with pytest.raises(ValueError, match='unknown --arch'):
    convert.convert_backbone(toy_backbone, {})
  message = _problems(
    tiny_config(
      **{'model.backbone': toy_backbone, 'model.output_stride': 8, 'init_from': 'imagenet'}
    )
  )
  assert "for toy it has no ImageNet weights: set init_from=''" in message


def test_a_registered_dataset_validates_and_builds_sources(toy_dataset):
  config = tiny_config(**{'data.name': toy_dataset, 'data.num_classes': 3})
  config_lib.validate(config, num_devices=8)
  built = validate.validate_config_data(config)  # the pre-training data check
  assert {s: len(v) for s, v in built.items()} == {'labeled': 4, 'unlabeled': 4, 'val': 4}
  val = sources.get_source(config.data, 'val')
  assert val.class_names == TOY_CLASSES and val.labels is not None
  np.testing.assert_array_equal(val.palette, TOY_PALETTE)
  label = sources.decode_label(val.labels[0], val.from_files, num_classes=3).numpy()
  assert set(np.unique(label)) == {0, 1, 2}
  # Names and colours without reading data (what predict and drawing use).
  assert datasets.class_names(config.data) == TOY_CLASSES
  np.testing.assert_array_equal(predict.dataset_palette(config), TOY_PALETTE)
  # The entry's class count is checked where splits are built: by the data
  # check before training (and --validate_only), a DataError naming the fix.
  wrong = tiny_config(**{'data.name': toy_dataset, 'data.num_classes': 4})
  with pytest.raises(sources.DataError) as e:
    validate.validate_config_data(wrong)
  assert 'the toy_shapes dataset has 3 classes; set data.num_classes=3' in str(e.value)


def test_unknown_names_list_the_tables():
  message = _problems(tiny_config(**{'data.name': 'vocc', 'model.backbone': 'resnet5'}))
  assert f"data.name='vocc' is not one of {datasets.names()}" in message
  assert f"model.backbone='resnet5' is not one of {backbones.names()}" in message
  with pytest.raises(sources.DataError, match='vocc'):
    sources.get_source(tiny_config(**{'data.name': 'vocc'}).data, 'val')


def test_table_entries_must_fit_the_head_and_their_classes():
  with pytest.raises(ValueError, match='subset of'):
    backbones.Backbone('os32', ToyBackbone, output_strides=(32,))
  with pytest.raises(ValueError, match='2 class names'):
    datasets.Dataset('bad', toy_source, num_classes=3, class_names=('a', 'b'))
  with pytest.raises(ValueError, match='already registered'):
    backbones.register(backbones.get('resnet50'))


@pytest.mark.slow
def test_unsupported_stride_is_an_exit_2_error_before_anything_is_built(tmp_path):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='8', TF_CPP_MIN_LOG_LEVEL='3', CUDA_VISIBLE_DEVICES='')
  workdir = tmp_path / 'run'
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'cac_jax.main',
      '--config=configs/tiny.py',
      f'--workdir={workdir}',
      '--config.model.backbone=mobilenet_v2',
      '--config.model.output_stride=8',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert errors == ['error: invalid config:'], proc.stderr[-3000:]
  assert (
    'model.output_stride=8 is not supported by mobilenet_v2 (it supports 16); '
    'set --config.model.output_stride=16'
  ) in proc.stderr
  assert not workdir.exists() or not any(workdir.iterdir())  # nothing written
