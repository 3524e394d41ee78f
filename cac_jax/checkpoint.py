"""Orbax checkpoints: the last k states plus the best one by val mIoU.

Each checkpoint holds the TrainState and the config (JSON). Orbax writes into
a temporary directory and renames it when complete, so a run killed in the
middle of a write never leaves a checkpoint that a restore would pick up
(leftover `*.orbax-checkpoint-tmp*` directories are deleted when the next
run opens the manager). A write that fails (disk full, directory gone,
permissions) raises `CheckpointWriteError`, which names the step, the
directory and the latest checkpoint that is still complete.
"""
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm
from etils import epath


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed; the checkpoints written before are intact."""


def make_manager(workdir, keep: int) -> ocp.CheckpointManager:
  """CheckpointManager under <workdir>/checkpoints keeping `keep` latest + best mIoU."""
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=keep),
      cm.BestN(get_metric_fn=lambda m: m['miou'], n=1,
               keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, create=True, cleanup_tmp_directories=True,
      # Saves block until written: a step counted as saved is on disk, which
      # is what preemption and the kill tests rely on. A save costs far less
      # than the interval between saves.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(epath.Path(workdir) / 'checkpoints',
                               options=options, item_names=('state', 'config'))


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
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict())), metrics=metrics, force=True)
  except Exception as e:  # any storage error: ENOSPC, ENOTDIR, EACCES, GCS...
    kept = (f'the latest complete checkpoint (step {latest}) is intact'
            if latest is not None else 'no earlier checkpoint exists')
    raise CheckpointWriteError(
        f'could not write the checkpoint of step {step} to {manager.directory} '
        f'({type(e).__name__}: {e}); {kept}. Fix the checkpoint directory (free '
        'space, permissions, mount) and rerun the same command to resume.') from e


def restore(manager, abstract_state, step=None):
  """Restores the state at `step` (default: latest) into `abstract_state`'s shardings."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored['state']


def restore_config(manager, step=None) -> dict:
  step = manager.latest_step() if step is None else step
  return manager.restore(step, args=ocp.args.Composite(
      config=ocp.args.JsonRestore()))['config']


def best_step(manager):
  """Step of the best-mIoU checkpoint still on disk, else the latest."""
  best, best_miou = None, -1.0
  for step in manager.all_steps():
    metrics = manager.metrics(step)
    if metrics and metrics.get('miou', -1.0) > best_miou:
      best, best_miou = step, metrics['miou']
  return manager.latest_step() if best is None else best
