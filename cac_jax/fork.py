"""Starting a run from another run's checkpoint (`config.fork_from`).

A fork continues another run's training state under a different config: the
step, the parameters, the BatchNorm statistics, the optimiser state and (if
both runs have one) the feature bank are read from the source checkpoint,
and training goes on from that step with this run's settings. The input
stream is indexed by step, so a fork sees exactly the batches the source
would have seen next; only what the config changes differs.

This is how a comparison shares its warm-up (`cac_jax.bench.ablation`): one
supervised warm-up per seed, saved at `cac.unsup_start_step`, and every arm
(CAC, supervised, controls) forks from it, so the arms differ only after the
fork.

What the two configs must share is the state's structure: the model (backbone,
heads, widths) and the optimiser. The bank is restored when both runs have
one of the same shape; a fork without a bank (supervised-only) skips it, and
a fork with a bank from a source without one starts with an empty bank, as a
run does at `unsup_start_step`. The source's evaluations are not copied: the
fork's own history starts after the fork step. Only a run's start reads
`fork_from`: a fork that holds checkpoints of its own resumes from them,
whether or not its source is still there.
"""

import os

import jax
from absl import logging

from cac_jax import checkpoint as ckpt_lib
from cac_jax import config_lib, paths

LATEST = -1


def source_step(config) -> int:
  """The source checkpoint's step (`fork_step`, or the source's latest)."""
  manager = ckpt_lib.make_manager(config.fork_from, keep=1_000_000)
  try:
    steps = sorted(manager.all_steps())
  finally:
    manager.close()
  if not steps:
    raise config_lib.ConfigError(
      f'fork_from={config.fork_from!r} holds no checkpoint; pass the workdir of a run '
      'that saved one'
    )
  step = steps[-1] if config.fork_step == LATEST else config.fork_step
  if step not in steps:
    raise config_lib.ConfigError(
      f'fork_step={config.fork_step}: {config.fork_from} has no checkpoint at that step; '
      f'its steps are {steps} (or fork_step={LATEST} for the latest)'
    )
  return step


def _source_has_bank(config, step) -> bool:
  saved = ckpt_lib.saved_config(config.fork_from, step) or {}
  cac = saved.get('cac', {})
  return bool(not cac.get('supervised_only', False) and cac.get('bank_steps', 1))


def forked_state(fresh_state, abstract_state, config):
  """This run's first state: `fresh_state` with the source checkpoint's fields.

  Args:
    fresh_state: the newly initialised TrainState (its bank, if any, is kept
      when the source has none).
    abstract_state: the matching TrainState of ShapeDtypeStructs (shardings).
    config: this run's config; `fork_from` names the source workdir.

  Returns:
    (state, step): the forked state and the source step.
  """
  if not paths.is_remote(config.fork_from) and not os.path.isdir(
    os.path.join(config.fork_from, 'checkpoints')
  ):
    raise config_lib.ConfigError(
      f'fork_from={config.fork_from!r} is not the workdir of a run with checkpoints (no '
      "checkpoints/ in it); pass such a workdir, or '' to start from scratch"
    )
  step = source_step(config)
  fields = ['step', 'params', 'batch_stats', 'opt_state']
  with_bank = abstract_state.bank is not None and _source_has_bank(config, step)
  if with_bank:
    fields.append('bank')
  target = {name: getattr(abstract_state, name) for name in fields}
  manager = ckpt_lib.make_manager(config.fork_from, keep=1_000_000)
  try:
    restored = ckpt_lib.restore(manager, target, step)
  except Exception as e:  # orbax raises many types for a structure mismatch
    raise config_lib.ConfigError(
      f"fork_from={config.fork_from} (step {step}) does not fit this config's train "
      f'state ({ckpt_lib.describe(e, 300)}); a fork may change the training settings '
      '(cac.*, bn.*, schedule) but not the model or the optimiser'
    ) from None
  finally:
    manager.close()
  restored = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), restored, target)
  logging.info('forked from %s at step %d (%s)', config.fork_from, step, ', '.join(fields))
  return fresh_state.replace(**restored), step
