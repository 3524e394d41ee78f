"""Entry point: `python -m cac_jax.main --config=configs/default.py --workdir=DIR`.

This file is intentionally short; the logic is in `cac_jax.train`. Fields are
overridden with `--config.field=value`. On a multi-host slice (TPU pod, or
launch/local_multiprocess.sh), pass `--multihost` (or set CAC_MULTIHOST=1) on
every host: it calls `jax.distributed.initialize()` before anything else.

Exit codes: 0 done (or preempted by SIGTERM after saving: rerun to resume);
2 a user error in the flags, config, workdir or data (one clean `error:`
line, no stack trace); 1 a run that stopped on a fault (non-finite loss,
checkpoint write or restore failure), with a message naming the step and the
checkpoint to resume from. Paths are resolved against the directory the
command was started from (`cac_jax.paths`).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from cac_jax import cli, paths

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs and TensorBoard.')
_MULTIHOST = flags.DEFINE_bool(
  'multihost',
  os.environ.get('CAC_MULTIHOST', '') == '1',
  'Call jax.distributed.initialize() (every host runs the same command).',
)
_VALIDATE_ONLY = flags.DEFINE_bool(
  'validate_only', False, 'Check the config and every data file, then exit.'
)
_STOP_AT_STEP = flags.DEFINE_integer(
  'stop_at_step',
  None,
  'Stop with a checkpoint once this global step is reached '
  '(the schedule still spans total_steps); rerun without it to continue.',
)
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
    process_id=int(os.environ['CAC_PROCESS_ID']),
  )


def _flag_error(error: Exception, argv) -> str | None:
  """A one-paragraph message for a user error in the flags, else None.

  config_flags reports a mistyped override (`--config.data.crop=64`) as a
  bare AttributeError, a missing config file as an OSError, and a ConfigError
  raised in a config file's get_config() (bad `:arg`) with the whole traceback
  inside the message. Users need the last line.
  """
  if isinstance(error, AttributeError):
    field = str(error).strip('"\'')
    where = [a for a in argv[1:] if a.startswith('--config.') and field in a]
    return (
      f'{where[0] if where else field}: {field!r} is not a config field '
      '(typo? the schema is base_config() in cac_jax/config_lib.py)'
    )
  if isinstance(error, OSError):
    return ' '.join(str(error).split()) + ' (check the --config path)'
  if isinstance(error, flags.Error):
    text = str(error)
    if 'Traceback (most recent call last)' not in text:
      return text
    last = text.strip().splitlines()[-1].strip()
    if last.startswith(('cac_jax.config_lib.ConfigError:', 'ConfigError:')):
      return f'{text.splitlines()[0].rstrip(": ")}: {last.split(": ", 1)[1]}'
  return None  # a bug in a config file, not a user error: keep the traceback


def _parse_flags(argv):
  """absl's flag parsing, with user errors as `error: ...` on stderr and exit 2."""
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.keys()  # a missing config file only raises on first access
    return rest
  except Exception as e:  # config_flags raises several types, see _flag_error
    message = _flag_error(e, argv)
    if message is None:
      raise
    print(f'error: {message}\nPass --helpshort to see the flags.', file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  cli.quiet_library_noise()
  import jax

  if _MULTIHOST.value:
    initialize_distributed()
  from cac_jax import checkpoint as ckpt_lib
  from cac_jax import config_lib, train

  config = _CONFIG.value
  # Relative paths mean relative to where the command was started, for good.
  paths.resolve_config(config)
  workdir = paths.resolve(_WORKDIR.value)
  try:
    if _VALIDATE_ONLY.value:
      from cac_jax.data import validate

      config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
      for warning in config_lib.warnings_for(config):
        print(f'warning: {warning}', file=sys.stderr)
      validate.validate_config_data(config)
      print('config and data OK')
      return
    scores = train.train_and_evaluate(config, workdir, stop_at_step=_STOP_AT_STEP.value)
  except config_lib.ConfigError as e:
    # User errors (including DataError): a clear message, no stack trace.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except (
    train.NonFiniteLossError,
    ckpt_lib.CheckpointWriteError,
    ckpt_lib.CheckpointRestoreError,
  ) as e:
    # Faults the messages explain (step, cause, checkpoint kept); a stack
    # trace would add nothing.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if scores:
    line = f'final val mIoU: {scores["miou"]:.4f}'
    if 'best_miou' in scores:
      line += f' (best {scores["best_miou"]:.4f} at step {scores["best_step"]})'
    print(line)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
