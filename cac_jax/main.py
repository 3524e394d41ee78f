"""Entry point: `python -m cac_jax.main --config=configs/default.py --workdir=DIR`.

This file is intentionally short; the logic is in `cac_jax.train`. Fields are
overridden with `--config.field=value`. On a multi-host slice (TPU pod, or
launch/local_multiprocess.sh), pass `--multihost` (or set CAC_MULTIHOST=1) on
every host: it calls `jax.distributed.initialize()` before anything else.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs and TensorBoard.')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', os.environ.get('CAC_MULTIHOST', '') == '1',
    'Call jax.distributed.initialize() (every host runs the same command).')
_VALIDATE_ONLY = flags.DEFINE_bool(
    'validate_only', False, 'Check the config and every data file, then exit.')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed():
  """jax.distributed.initialize(), explicit when CAC_COORDINATOR is set.

  On Cloud TPU the coordinator and process ids are discovered automatically.
  For N processes on one machine (launch/local_multiprocess.sh) set
  CAC_COORDINATOR=127.0.0.1:PORT, CAC_NUM_PROCESSES=N, CAC_PROCESS_ID=i; the
  CPU backend then needs gloo for cross-process collectives.
  """
  import jax
  coordinator = os.environ.get('CAC_COORDINATOR')
  if not coordinator:
    jax.distributed.initialize()
    return
  # Harmless for GPU/TPU backends; required for CPU processes to all-reduce.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=int(os.environ['CAC_NUM_PROCESSES']),
      process_id=int(os.environ['CAC_PROCESS_ID']))


def _quiet_library_logs():
  """Orbax and TFDS log every file operation at INFO; keep their warnings only."""
  import logging as std_logging
  noisy = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/xla_bridge')

  def keep(record):
    return record.levelno >= std_logging.WARNING or not any(
        n in record.pathname for n in noisy)
  logging.get_absl_handler().python_handler.addFilter(keep)


def main(argv):
  del argv
  _quiet_library_logs()
  import jax
  if _MULTIHOST.value:
    initialize_distributed()
  from cac_jax import config_lib, train

  config = _CONFIG.value
  try:
    if _VALIDATE_ONLY.value:
      from cac_jax.data import validate
      config_lib.validate(config, num_devices=jax.device_count(),
                          num_processes=jax.process_count())
      validate.validate_config_data(config)
      print('config and data OK')
      return
    scores = train.train_and_evaluate(config, _WORKDIR.value)
  except (config_lib.ConfigError, train.NonFiniteLossError) as e:
    # User errors: a clear message, no stack trace.
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if scores:
    print(f"final val mIoU: {scores['miou']:.4f}")


if __name__ == '__main__':
  app.run(main)
