"""`python -m cac_jax.evaluate`: a checkpoint's val mIoU, as training measured it."""

import os
import re
import subprocess
import sys

import pytest

from cac_jax import config_lib, evaluate
from cac_jax.data import embedded
from train_utils import REPO, tiny_config


@pytest.fixture(scope='module')
def run(tiny_run):
  return tiny_run  # conftest: trained once per test worker, shared


def test_evaluate_run_reproduces_training_miou(run):
  workdir, train_scores = run
  scores, names, step, config = evaluate.evaluate_run(workdir)
  assert step == 4 and names == embedded.CLASS_NAMES
  assert config.eval.flip is False
  # Same checkpoint, same eval protocol, same devices: identical confusion.
  # (Training adds the run's best mIoU so far and its step.)
  assert train_scores['best_step'] == 4 and train_scores['best_miou'] == scores['miou']
  assert scores == {k: v for k, v in train_scores.items() if not k.startswith('best_')}


def test_overrides_only_touch_eval_fields():
  config = tiny_config()
  evaluate.apply_overrides(config, {'eval.flip': True, 'data.eval_batch_size': 16})
  assert config.eval.flip is True and config.data.eval_batch_size == 16
  with pytest.raises(config_lib.ConfigError, match='model.backbone cannot be changed'):
    evaluate.apply_overrides(config, {'model.backbone': 'resnet50'})


def test_format_table_lists_every_class():
  names = ('a', 'bb')
  table = evaluate.format_table(
    {'iou/a': 0.5, 'iou/bb': 0.25, 'miou': 0.375, 'pixel_acc': 0.9}, names
  )
  assert re.search(r'^a\s+50\.00$', table, re.M)
  assert re.search(r'^bb\s+25\.00$', table, re.M)
  assert re.search(r'^mIoU\s+37\.50$', table, re.M)
  assert re.search(r'^pixel accuracy\s+90\.00$', table, re.M)


def _cli(*args):
  env = dict(
    os.environ,
    CUDA_VISIBLE_DEVICES='',
    TF_CPP_MIN_LOG_LEVEL='3',
    JAX_COMPILATION_CACHE_DIR=str(REPO / '.cache' / 'jax'),
  )
  return subprocess.run(
    [sys.executable, '-m', 'cac_jax.evaluate', *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_command_line_prints_table_with_training_miou(run):
  workdir, train_scores = run
  proc = _cli(f'--workdir={workdir}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in embedded.CLASS_NAMES:
    assert re.search(rf'^{name}\s+\d+\.\d\d$', proc.stdout, re.M), proc.stdout
  miou = float(re.search(r'^mIoU\s+(\d+\.\d\d)$', proc.stdout, re.M).group(1))
  # One device here, eight in training: evaluation has no cross-image
  # reduction (BatchNorm uses running statistics), so the integer confusion
  # matrix is the same; only printing with 2 decimals differs, by at most half
  # a unit in the last place (0.005) plus float64 slack.
  assert miou == pytest.approx(100 * train_scores['miou'], abs=0.0051)
  assert 'step 4' in proc.stdout


def test_command_line_user_errors_have_no_stack_trace(run, tmp_path):
  workdir, _ = run
  for args in (
    [f'--workdir={tmp_path}'],
    [f'--workdir={workdir}', '--config.model.backbone=resnet50'],
  ):
    proc = _cli(*args)
    assert proc.returncode == 2
    assert 'error:' in proc.stderr and 'Traceback' not in proc.stderr


@pytest.mark.parametrize('opt_state', ['absent', 'different'])
def test_inference_reads_params_and_batch_stats_only(run, tmp_path, opt_state):
  """evaluate (and so predict, which shares `saved_run.load_run`) works on a
  checkpoint whose optimiser state is absent or has another structure, and
  scores it exactly as the intact run: only params and batch_stats are read."""
  import jax
  import ml_collections
  import numpy as np

  from cac_jax import checkpoint as ckpt_lib
  from cac_jax import saved_run

  workdir, train_scores = run
  config, _, variables, step = saved_run.load_run(workdir, which='latest')
  state = {
    'step': np.int32(step),
    'params': variables['params'],
    'batch_stats': variables['batch_stats'],
  }
  if opt_state == 'different':
    state['opt_state'] = ({'momentum': np.zeros(3, np.float32)},)
  manager = ckpt_lib.make_manager(str(tmp_path), keep=1)
  ckpt_lib.save(manager, step, state, ml_collections.ConfigDict(config.to_dict()))
  manager.wait_until_finished()
  manager.close()
  got, _, got_step, _ = evaluate.evaluate_run(str(tmp_path), which='latest')
  assert got_step == step
  assert got == {k: v for k, v in train_scores.items() if not k.startswith('best_')}
  _, _, again, _ = saved_run.load_run(str(tmp_path))
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
