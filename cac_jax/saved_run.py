"""Load a trained run for inference: config, model and variables from a workdir.

`load_run` reads the config saved beside a checkpoint (so the network is
rebuilt exactly as it was trained, whatever the config files say today),
restores only what inference needs, params and batch_stats (orbax partial
restore: the optimiser state and the bank are not read), onto the current
devices, replicated.

The checkpoint directory is opened read-only: a training job may be writing to
the same workdir, and a read-write CheckpointManager cleans up temporary
directories on creation, which would delete a save in progress.
"""

import os
import sys

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from cac_jax import checkpoint as ckpt_lib
from cac_jax import config_lib, paths, sharding
from cac_jax import train_state as state_lib
from cac_jax.models import build_model

WHICH = ('best', 'latest')


class RunError(config_lib.ConfigError):
  """The workdir holds no usable checkpoint; the message says what to do."""


def open_manager(workdir: str) -> ocp.CheckpointManager:
  """A read-only CheckpointManager on <workdir>/checkpoints.

  Raises:
    RunError: the directory is missing or holds no finished checkpoint.
  """
  directory = epath.Path(workdir) / 'checkpoints'
  if not os.path.isdir(directory):
    raise RunError(
      f'{directory} does not exist: --workdir must be the directory a '
      'training run wrote to (python -m cac_jax.main --workdir=...).'
    )
  manager = ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    item_names=('state', 'config'),
  )
  if not manager.all_steps():
    raise RunError(
      f'{directory} holds no finished checkpoint yet; wait for the '
      'run to save one (every config.checkpoint_every steps).'
    )
  return manager


def choose_step(manager, *, step: int | None = None, which: str = 'best') -> int:
  """`step` if given (must exist), else the best-mIoU or the latest step."""
  steps = sorted(manager.all_steps())
  if step is not None:
    if step not in steps:
      raise RunError(f'no checkpoint at step {step}; available steps: {steps}.')
    return int(step)
  if which not in WHICH:
    raise RunError(f'which={which!r} must be one of {WHICH}.')
  # best_step falls back to the latest step when no checkpoint has an mIoU.
  return int(ckpt_lib.best_step(manager) if which == 'best' else manager.latest_step())


def load_run(workdir: str, *, step: int | None = None, which: str = 'best'):
  """Loads a trained run on the current devices.

  Args:
    workdir: the run's --workdir (holds checkpoints/).
    step: a specific checkpoint step; overrides `which`.
    which: 'best' (highest val mIoU; the latest if none has one) or 'latest'.

  Returns:
    (config, model, variables, step): the run's ConfigDict as saved with that
    checkpoint, the unbound DeepLabV3Plus, {'params', 'batch_stats'} replicated
    over `sharding.make_mesh()` (all devices), and the step restored.

  Raises:
    RunError: no checkpoint, or no checkpoint at `step`.
  """
  workdir = paths.resolve(str(workdir))
  manager = open_manager(workdir)
  explicit_step = step
  step = choose_step(manager, step=step, which=which)
  # The config saved with that step (the network is the same for every step
  # of a run: resuming with another one is refused), read as plain JSON so
  # that a damaged checkpoint still names itself below.
  saved = ckpt_lib.saved_config(workdir, step)
  if saved is None:
    raise RunError(
      f'no checkpoint in {manager.directory} holds a readable config; the run directory is damaged'
    )
  config = _with_new_fields(ml_collections.ConfigDict(saved))
  model = build_model(config.model, num_classes=config.data.num_classes)
  # Only what inference needs is read (orbax partial restore): the optimiser
  # state and the bank stay on disk, whatever their shape.
  mesh = sharding.make_mesh()
  abstract = state_lib.abstract_variables(model, config, mesh)
  try:
    state = ckpt_lib.restore(manager, abstract, step)
  except Exception as e:  # orbax/TensorStore raise many types for bad files
    why = ckpt_lib.describe(e, 300)
    if explicit_step is not None:
      raise ckpt_lib.CheckpointRestoreError(
        f'checkpoint {step} in {manager.directory} cannot be read ({why}); pass --step '
        f'with another of the steps {sorted(manager.all_steps())}'
      ) from None
    # The chosen (best or latest) checkpoint is damaged: the newest intact one.
    print(
      f'warning: checkpoint {step} cannot be read ({why}); using the newest '
      'intact checkpoint instead',
      file=sys.stderr,
    )
    state, step = ckpt_lib.restore_latest_intact(manager, abstract)
    config = _with_new_fields(
      ml_collections.ConfigDict(ckpt_lib.saved_config(workdir, step) or saved)
    )
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  manager.close()
  return config, model, variables, step


# Config blocks whose fields a run saved before they existed gets at their
# defaults: the evaluation options (not part of the network, so they may
# change after training), `bn` (where the BatchNorm statistics came from;
# its default, 'all', is what every run made before it did) and `cac` (new
# compute options of the DC loss, e.g. anchor_block, which change no result).
NEW_FIELD_BLOCKS = ('eval', 'bn', 'cac')


def _with_new_fields(config):
  """`config` with the fields of NEW_FIELD_BLOCKS added since it was saved, at their defaults.

  Inference reads a run's saved config (`load_run`), so a run saved before a
  field existed evaluates, predicts and reports with its default. (Resuming
  training reads the config of the command line instead, and
  `run_dir.config_differences` counts a field missing from the saved config
  as its default, so an old run resumes with the defaults too.)
  """
  from cac_jax import config_lib

  base = config_lib.base_config()
  with config.unlocked():
    for block in NEW_FIELD_BLOCKS:
      if block not in config:
        config[block] = ml_collections.ConfigDict()
      for key in base[block].keys():
        if key not in config[block]:
          config[block][key] = base[block][key]
  return config


def mesh_of(variables) -> jax.sharding.Mesh:
  """The mesh the restored variables live on (for jit shardings)."""
  return jax.tree.leaves(variables)[0].sharding.mesh
