"""Two real processes (jax.distributed on 127.0.0.1, 4 CPU devices each).

launch/local_multiprocess.sh runs `python -m cac_jax.main --multihost` in
each, exactly as every host of a pod would, on a shared workdir. Both must end with the same parameters, equal to
a single process with 8 devices training on the same global batches.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cac_jax import checkpoint as ckpt_lib
from cac_jax import optim, sharding, train, train_state
from cac_jax.models import build_model

from train_utils import REPO, tiny_config

pytestmark = pytest.mark.slow


def _restore_params(workdir):
  config = tiny_config()
  model = build_model(config.model, num_classes=config.data.num_classes)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh()
  manager = ckpt_lib.make_manager(workdir, 2)
  state = ckpt_lib.restore(manager, train_state.abstract_state(model, tx, config, mesh))
  return jax.device_get(state.params)


def test_two_processes_match_one(tmp_path):
  workdir = tmp_path / 'multi'
  env = dict(os.environ, DEVICES_PER_PROCESS='4', PYTHON=sys.executable,
             JAX_COMPILATION_CACHE_DIR=str(REPO / '.cache' / 'jax'))
  result = subprocess.run(
      ['bash', 'launch/local_multiprocess.sh', '2', 'configs/tiny.py', str(workdir)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  logs = [(workdir / f'process_{i}.log').read_text() for i in range(2)]
  assert result.returncode == 0, result.stderr + logs[0][-3000:] + logs[1][-3000:]
  # Each host evaluated the same full val set and printed the same mIoU.
  mious = [line for log in logs for line in log.splitlines()
           if line.startswith('final val mIoU')]
  assert len(mious) == 2 and mious[0] == mious[1], mious
  assert '2 hosts' in logs[0]

  train.train_and_evaluate(tiny_config(), str(tmp_path / 'single'))
  multi, single = _restore_params(str(workdir)), _restore_params(str(tmp_path / 'single'))
  # Same global batches, same devices count; only the all-reduce differs
  # (gloo across processes vs in-process), so allow float32 round-off.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               multi, single)
