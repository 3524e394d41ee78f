"""Same seed and config -> identical metrics and parameters, bit for bit (CPU).

Determinism is what makes a resumed run equal an uninterrupted one (see
test_faults.py) and makes ablations comparable. Wall-clock metrics are the
only ones allowed to differ.
"""

import jax
import numpy as np

from cac_jax import train
from train_utils import read_scalars, restored_state, tiny_config

TIMING_TAGS = ('images_per_sec', 'steps_per_sec', 'uptime')


def _untimed(scalars):
  return {tag: steps for tag, steps in scalars.items() if not any(t in tag for t in TIMING_TAGS)}


def test_same_seed_same_metrics_and_params(tiny_run, tmp_path):
  config = tiny_config()  # 4 steps: 2 supervised, 2 with the DC loss and bank
  # `tiny_run` trained this config in this process (once per test worker).
  runs = [tiny_run[0], str(tmp_path / 'b')]
  train.train_and_evaluate(config, runs[1])
  a, b = (_untimed(read_scalars(w)) for w in runs)
  assert 'train/loss_dc' in a and 'val/miou' in a
  assert a == b  # exact float equality of every value, every step
  jax.tree.map(np.testing.assert_array_equal, *(restored_state(w, config).params for w in runs))

  # The comparison has teeth: another seed changes the very first loss.
  other = str(tmp_path / 'seed1')
  train.train_and_evaluate(tiny_config(seed=1), other, stop_after=1)
  assert read_scalars(other)['train/loss'][1] != a['train/loss'][1]
