"""Test set-up: 8 fake CPU devices and the persistent compilation cache.

Both must be configured before the first JAX computation, which is why they
live here and not in the tests.
"""

import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / '.cache' / 'jax'

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_compilation_cache_dir', str(CACHE_DIR))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """(workdir, final scores) of configs/tiny.py trained once per test worker."""
  from cac_jax import train
  from train_utils import tiny_config

  workdir = str(tmp_path_factory.mktemp('tiny_run'))
  return workdir, train.train_and_evaluate(tiny_config(), workdir)
