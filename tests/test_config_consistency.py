"""Every shipped config trains the network it evaluates."""

import pathlib
import runpy

import pytest

from cac_jax.models import deeplabv3plus

CONFIGS = sorted(
  p for p in (pathlib.Path(__file__).parents[1] / 'configs').glob('*.py') if p.name != '__init__.py'
)
# The largest val image side of each dataset (VOC: 500; Cityscapes: 2048 x 1024).
VAL_SIDE = {'voc': 500, 'cityscapes': 2048, 'folder': 500}


def _eval_side(config) -> int:
  if config.eval.window:
    return int(config.eval.window)
  if config.data.name == 'embedded':
    return int(config.data.embedded.image_size)
  return VAL_SIDE[config.data.name]


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_training_crops_reach_every_aspp_tap_that_evaluation_uses(path):
  config = runpy.run_path(str(path))['get_config']()
  dead = deeplabv3plus.untrained_aspp_rates(
    int(config.model.output_stride), int(config.data.crop_size), _eval_side(config)
  )
  assert not dead, (
    f'{path.name}: crop {config.data.crop_size} at output stride '
    f'{config.model.output_stride} never trains the ASPP rate(s) {dead} that '
    f'evaluation at {_eval_side(config)} px uses'
  )


@pytest.mark.parametrize(
  'output_stride,train,evaluate,want',
  [
    (16, 64, 128, (6,)),  # 4 cells in training, 8 at evaluation
    (16, 64, 64, ()),  # the same maps
    (16, 320, 500, ()),  # VOC: 20 cells reach rate 18
    (16, 160, 500, (12, 18)),  # 10 cells: rate 6 only
    (8, 64, 128, (12,)),  # rates 12, 24, 36 on 8 vs 16 cells
  ],
)
def test_untrained_aspp_rates(output_stride, train, evaluate, want):
  assert deeplabv3plus.untrained_aspp_rates(output_stride, train, evaluate) == want
