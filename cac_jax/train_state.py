"""The train state and its sharded creation.

Everything a run needs to continue lives in one pytree of arrays, so a
checkpoint of it (plus the step-indexed input stream) resumes a run exactly.
The model and the optimiser are not part of it: they are rebuilt from the
config, which is saved beside each checkpoint.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp

from cac_jax import bank as bank_lib
from cac_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any
  batch_stats: Any
  opt_state: Any
  # Negatives of the previous `bank_steps` steps; None when there is no bank
  # (bank_steps=0 or supervised-only): orbax cannot save zero-size arrays.
  bank: bank_lib.FeatureBank | None


def dc_feature_shape(model, config) -> tuple[int, int]:
  """(cells per view, feature width) of the DC-loss features, from the model.

  Read off `jax.eval_shape` of the network's stride-8 projected output at the
  training crop (nothing is computed), so the bank always matches what the
  model produces: the projector's width, or without the projector (an
  ablation) the decoder's own channels.
  """
  crop = config.data.crop_size

  def proj8(key):
    x = jnp.zeros((1, crop, crop, 3), jnp.float32)
    out, _ = model.init_with_output(
      {'params': key, 'dropout': key}, x, train=False, dc_outputs=True
    )
    return out['proj8']

  _, h, w, dim = jax.eval_shape(proj8, jax.random.key(0)).shape
  return h * w, dim


def negatives_per_step(config, cells: int) -> int:
  """Entries a step contributes to the bank: both views of every unlabeled image.

  cells: the stride-8 cells of one view (`dc_feature_shape`).
  """
  if config.cac.supervised_only:
    return 0
  per_view = config.cac.neg_per_image or cells
  return 2 * config.data.unlabeled_batch_size * min(per_view, cells)


def _init_variables(model, crop: int, key) -> dict:
  """{'params', 'batch_stats'} of a fresh network, initialised at the training crop."""
  x = jnp.zeros((1, crop, crop, 3), jnp.float32)
  variables = model.init({'params': key, 'dropout': key}, x, train=False)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def _replicated_shapes(tree, mesh):
  rep = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)


def make_init_fn(model, tx, config):
  """Returns init(key) -> TrainState, pure and jittable."""
  crop = config.data.crop_size
  capacity, dim = 0, 0
  if not config.cac.supervised_only and config.cac.bank_steps:
    cells, dim = dc_feature_shape(model, config)
    capacity = bank_lib.bank_capacity(config.cac.bank_steps, negatives_per_step(config, cells))

  def init(key):
    variables = _init_variables(model, crop, key)
    params = variables['params']
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables['batch_stats'],
      opt_state=tx.init(params),
      bank=bank_lib.init_bank(capacity, dim) if capacity else None,
    )

  return init


def create_sharded_state(model, tx, config, mesh, key):
  """Creates the state directly in its (replicated) sharding.

  Shapes come from `jax.eval_shape`, so nothing is materialised on the host
  and copied: each device computes its own replica.

  Returns:
    (state, state_shardings): the state, and the matching pytree of shardings
    (to reuse as out_shardings of the train step and for checkpoint restore).
  """
  init = make_init_fn(model, tx, config)
  abstract = jax.eval_shape(init, key)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  state = jax.jit(init, out_shardings=shardings)(key)
  return state, shardings


def abstract_variables(model, config, mesh) -> dict:
  """{'params', 'batch_stats'} as replicated ShapeDtypeStructs: what inference restores."""
  abstract = jax.eval_shape(
    lambda key: _init_variables(model, config.data.crop_size, key), jax.random.key(0)
  )
  return _replicated_shapes(abstract, mesh)


def abstract_state(model, tx, config, mesh):
  """ShapeDtypeStructs with shardings: the restore target for orbax."""
  init = make_init_fn(model, tx, config)
  return _replicated_shapes(jax.eval_shape(init, jax.random.key(0)), mesh)
