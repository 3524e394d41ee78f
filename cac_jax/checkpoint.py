"""Orbax checkpoints: the last k states plus the best one by val mIoU.

Each checkpoint holds the TrainState and the config (JSON). Orbax writes into
a temporary directory and renames it when complete, so a run killed in the
middle of a write never leaves a checkpoint that a restore would pick up
(leftover `*.orbax-checkpoint-tmp*` directories are deleted when the next
run opens the manager). A write that fails (disk full, directory gone,
permissions) raises `CheckpointWriteError`, which names the step, the
directory and the latest checkpoint that is still complete, and says whether
the cause is the storage or the program.

`restore_latest_intact` restores the newest checkpoint that reads back; a
damaged newer one (truncated data file, missing metadata) is named in a
warning and, in training, moved aside to `<workdir>/damaged_checkpoints/`.
"""

import json
import os
import re
import shutil
import sys
import time

import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as cm

from cac_jax import paths


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed; the checkpoints written before are intact."""


class CheckpointRestoreError(RuntimeError):
  """No checkpoint of the workdir could be read back; nothing was changed."""


# Storage failures as orbax/TensorStore report them when they do not raise an
# OSError (their C++ errors arrive as ValueError with the status text).
_STORAGE_PHRASES = (
  'no space left',
  'disk quota',
  'permission denied',
  'read-only file system',
  'not a directory',
  'no such file or directory',
  'resource_exhausted',
  'permission_denied',
  'input/output error',
  'unavailable',
)


def describe(error: BaseException, limit: int | None = None) -> str:
  """'Type: message' on one line (TensorStore's span many), cut to `limit` characters."""
  text = ' '.join(f'{type(error).__name__}: {error}'.split())
  return text if limit is None else text[:limit]


def is_storage_error(error: BaseException) -> bool:
  """True if `error` (or an exception it was raised from) is a storage failure."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError):
      return True
    if any(p in str(error).lower() for p in _STORAGE_PHRASES):
      return True
    error = error.__cause__ or error.__context__
  return False


def make_manager(workdir, keep: int) -> ocp.CheckpointManager:
  """CheckpointManager under <workdir>/checkpoints keeping `keep` latest + best mIoU."""
  policy = cm.AnyPreservationPolicy(
    [
      cm.LatestN(n=keep),
      cm.BestN(get_metric_fn=lambda m: m['miou'], n=1, keep_checkpoints_without_metrics=False),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=policy,
    create=True,
    cleanup_tmp_directories=True,
    # Saves block until written: a step counted as saved is on disk, which
    # is what preemption and the kill tests rely on. A save costs far less
    # than the interval between saves.
    enable_async_checkpointing=False,
  )
  return ocp.CheckpointManager(
    epath.Path(workdir) / 'checkpoints', options=options, item_names=('state', 'config')
  )


def save(manager, step: int, state, config, metrics=None) -> None:
  """Saves state + config at `step` (a no-op if that step is already saved).

  Raises:
    CheckpointWriteError: the write failed. Orbax wrote into a temporary
      directory, so no partial step `step` exists and earlier steps are
      untouched (old ones are only deleted after a successful save).
  """
  # Known before the write: after a failure the manager's own view of the
  # directory is not trustworthy (it may be gone or be a file).
  latest = manager.latest_step()
  try:
    if step in manager.all_steps():
      return
    manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())
      ),
      metrics=metrics,
      force=True,
    )
  except Exception as e:  # any storage error: ENOSPC, ENOTDIR, EACCES, GCS...
    kept = (
      f'the latest complete checkpoint (step {latest}) is intact'
      if latest is not None
      else 'no earlier checkpoint exists'
    )
    cause = describe(e)
    if len(cause) > 300:
      # TensorStore's messages are long; keep the start and the OS's reason.
      reason = re.search(
        r'(no space left on device|disk quota exceeded|permission denied|'
        r'read-only file system|not a directory|input/output error)',
        cause,
        flags=re.I,
      )
      cause = cause[:200] + ' ... ' + (reason.group(1) if reason else cause[-80:])
    if is_storage_error(e):
      raise CheckpointWriteError(
        f'could not write the checkpoint of step {step} to {manager.directory} '
        f'({cause}); {kept}. Fix the checkpoint directory (free space, permissions, '
        'mount) and rerun the same command to resume.'
      ) from e
    raise CheckpointWriteError(
      f'could not write the checkpoint of step {step} to {manager.directory}: an '
      f'error in cac_jax or its configuration, not in the storage ({cause}); {kept}. '
      'Please report it with this message.'
    ) from e


def restore(manager, abstract_state, step=None):
  """Restores the state at `step` (default: latest) into `abstract_state`'s shardings.

  `abstract_state` is a TrainState of ShapeDtypeStructs (everything is read),
  or a dict of some of its fields, e.g. {'params': ..., 'batch_stats': ...}
  for inference: then only those are read (orbax's partial restore), so a
  checkpoint whose optimiser state or bank is absent or of another shape
  still serves.
  """
  step = manager.latest_step() if step is None else step
  if isinstance(abstract_state, dict):
    args = ocp.args.PyTreeRestore(
      item=abstract_state,
      partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
    )
  else:
    args = ocp.args.StandardRestore(abstract_state)
  return manager.restore(step, args=ocp.args.Composite(state=args))['state']


def _move_aside(manager, step: int, workdir) -> str:
  """Moves checkpoint `step` to <workdir>/damaged_checkpoints/; returns the new path."""
  source = os.path.join(str(manager.directory), str(step))
  target_dir = os.path.join(str(workdir), 'damaged_checkpoints')
  os.makedirs(target_dir, exist_ok=True)
  target = os.path.join(target_dir, f'{step}.{time.strftime("%Y%m%d-%H%M%S")}')
  shutil.move(source, target)
  return target


def _all_processes(ok: bool) -> bool:
  """True if `ok` holds on every process (one allgather; free on one process)."""
  import jax

  if jax.process_count() == 1:
    return ok
  import numpy as np
  from jax.experimental import multihost_utils

  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def restore_latest_intact(manager, abstract_state, *, workdir=None):
  """Restores the newest checkpoint that reads back on every process; (state, step).

  Newer checkpoints that fail to restore (on any process) are reported in a
  warning. With `workdir` (training, the only writer) process 0 moves them to
  `<workdir>/damaged_checkpoints/` and every process reloads its view of the
  directory, so that later saves of those steps happen and later restores
  skip them. On a remote workdir, which cannot be renamed safely, a damaged
  checkpoint stops the run with instructions instead. Read-only callers
  (predict, evaluate) pass no workdir and move nothing.

  Raises:
    CheckpointRestoreError: no checkpoint restores (e.g. the state's
      structure changed; nothing is moved), or a remote workdir holds a
      damaged one.
  """
  import jax

  steps = sorted(manager.all_steps(), reverse=True)
  failures = []
  for step in steps:
    state, why = None, None
    try:
      state = restore(manager, abstract_state, step)
    except Exception as e:  # orbax/TensorStore raise many types for bad files
      why = describe(e, 300)
    if not _all_processes(why is None):
      failures.append((step, why or 'unreadable on another host'))
      continue
    if failures and workdir is not None and paths.is_remote(str(workdir)):
      raise CheckpointRestoreError(
        f'checkpoint(s) {[s for s, _ in failures]} in {manager.directory} cannot be '
        f'read ({failures[0][1]}); the newest intact one is step {step}. Delete the '
        'damaged step directories and rerun to resume from it'
      )
    lead = jax.process_index() == 0
    for bad, why in failures:
      where = ''
      if workdir is not None and lead:
        where = f'; moved to {_move_aside(manager, bad, workdir)}'
      logging.warning(
        'checkpoint %d is damaged and was skipped (%s)%s; using step %d', bad, why, where, step
      )
      if lead:
        print(
          f'warning: checkpoint {bad} is damaged and was skipped ({why}){where}; using step {step}',
          file=sys.stderr,
        )
    if failures and workdir is not None:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices('cac_jax: damaged checkpoints moved aside')
      manager.reload()
    return state, step
  first = failures[0] if failures else (None, 'no checkpoint')
  raise CheckpointRestoreError(
    f'no checkpoint in {manager.directory} could be restored (steps '
    f'{[s for s, _ in failures]}; newest: {first[1]}). Nothing was changed; if the '
    'files are damaged, move them away to start again'
  )


def saved_config(workdir, step=None) -> dict | None:
  """The config saved with checkpoint `step`, else with the newest checkpoint
  that has a readable one; None if there is none.

  Read as plain JSON (no orbax; local or gs:// through etils), so that it
  works before a manager exists and when a checkpoint's state is damaged.
  """
  directory = epath.Path(str(workdir)) / 'checkpoints'
  try:
    names = [p.name for p in directory.iterdir()] if directory.is_dir() else []
  except OSError:
    names = []
  steps = sorted((int(n) for n in names if n.isdigit()), reverse=True)
  if step is not None:
    steps = [step] + [s for s in steps if s != step]
  for s in steps:
    try:
      return json.loads((directory / str(s) / 'config' / 'metadata').read_text())
    except (OSError, ValueError):
      continue
  return None


def restore_config(manager, step=None) -> dict:
  step = manager.latest_step() if step is None else step
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def best_step(manager):
  """Step of the best-mIoU checkpoint still on disk, else the latest."""
  best, best_miou = None, -1.0
  for step in manager.all_steps():
    metrics = manager.metrics(step)
    if metrics and metrics.get('miou', -1.0) > best_miou:
      best, best_miou = step, metrics['miou']
  return manager.latest_step() if best is None else best
