"""config.fork_from: a run that starts from another run's checkpoint.

The ablation's shared warm-up rests on one fact tested here: a warm-up that
stops at unsup_start_step, forked into a run with the same settings, ends
bit for bit where the uninterrupted run ends (same step-indexed batches,
same keys, same state). Forks with other settings run from the same state.
"""

import jax
import numpy as np
import pytest

from cac_jax import checkpoint as ckpt_lib
from cac_jax import config_lib, train
from train_utils import restored_state, tiny_config


@pytest.fixture(scope='module')
def warmup(tmp_path_factory):
  """A CAC run stopped at its unsup_start_step (2 of 4 steps)."""
  workdir = str(tmp_path_factory.mktemp('warmup'))
  config = tiny_config()
  train.train_and_evaluate(config, workdir, stop_at_step=config.cac.unsup_start_step)
  assert ckpt_lib.make_manager(workdir, 2).latest_step() == config.cac.unsup_start_step
  return workdir


def test_fork_of_the_warmup_is_the_uninterrupted_run(warmup, tiny_run, tmp_path):
  full_dir, _ = tiny_run  # tiny_config() trained from scratch to step 4
  config = tiny_config(fork_from=warmup)
  scores = train.train_and_evaluate(config, str(tmp_path / 'fork'))
  full = restored_state(full_dir, tiny_config())
  forked = restored_state(tmp_path / 'fork', config)
  assert int(forked.step) == config.total_steps
  # Exact on CPU: the fork resumes the same state with the same stream and keys.
  jax.tree.map(np.testing.assert_array_equal, full.params, forked.params)
  jax.tree.map(np.testing.assert_array_equal, full.opt_state, forked.opt_state)
  jax.tree.map(np.testing.assert_array_equal, full.bank, forked.bank)
  # The fork's own history starts after the fork: its best is a later step.
  assert scores['best_step'] > config.cac.unsup_start_step


def test_supervised_fork_equals_the_supervised_run(warmup, tmp_path):
  """A fork without a bank reads the rest: its steps are the supervised run's."""
  sup = tiny_config(**{'cac.supervised_only': True})
  train.train_and_evaluate(sup, str(tmp_path / 'scratch'))
  fork = tiny_config(**{'cac.supervised_only': True, 'fork_from': warmup})
  train.train_and_evaluate(fork, str(tmp_path / 'fork'))
  scratch = restored_state(tmp_path / 'scratch', sup)
  forked = restored_state(tmp_path / 'fork', fork)
  assert forked.bank is None
  jax.tree.map(np.testing.assert_array_equal, scratch.params, forked.params)
  jax.tree.map(np.testing.assert_array_equal, scratch.batch_stats, forked.batch_stats)


def test_fork_that_changes_the_model_is_a_clear_error(warmup, tmp_path):
  config = tiny_config(**{'model.proj_dim': 16, 'fork_from': warmup})
  with pytest.raises(config_lib.ConfigError, match='not the model or the optimiser'):
    train.train_and_evaluate(config, str(tmp_path / 'fork'))
  assert not (tmp_path / 'fork' / 'checkpoints').exists() or not any(
    (tmp_path / 'fork' / 'checkpoints').iterdir()
  )


def test_fork_step_that_does_not_exist_names_the_steps(warmup, tmp_path):
  config = tiny_config(fork_from=warmup, fork_step=3)
  with pytest.raises(config_lib.ConfigError, match=r'its steps are \[2\]'):
    train.train_and_evaluate(config, str(tmp_path / 'fork'))


def test_missing_source_is_a_clear_error_and_only_a_start_reads_it(warmup, tmp_path):
  config = tiny_config(fork_from=str(tmp_path / 'nowhere'))
  with pytest.raises(config_lib.ConfigError, match='not the workdir of a run with checkpoints'):
    train.train_and_evaluate(config, str(tmp_path / 'fork'))
  # A fork that has checkpoints of its own resumes without its source.
  import shutil

  source = tmp_path / 'source'
  shutil.copytree(warmup, source)
  config = tiny_config(fork_from=str(source))
  train.train_and_evaluate(config, str(tmp_path / 'fork2'), stop_after=1)
  shutil.rmtree(source)
  train.train_and_evaluate(config, str(tmp_path / 'fork2'))
  assert ckpt_lib.make_manager(str(tmp_path / 'fork2'), 2).latest_step() == 4
