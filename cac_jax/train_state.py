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
from cac_jax.models.deeplabv3plus import HEAD_CHANNELS


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: number of updates applied
  params: Any
  batch_stats: Any
  opt_state: Any
  # Negatives of the previous `bank_steps` steps; None when there is no bank
  # (bank_steps=0 or supervised-only): orbax cannot save zero-size arrays.
  bank: bank_lib.FeatureBank | None


def negatives_per_step(config) -> int:
  """Entries this step contributes to the bank: both views of every unlabeled image."""
  if config.cac.supervised_only:
    return 0
  cells = (config.data.crop_size // 8) ** 2
  per_view = config.cac.neg_per_image or cells
  return 2 * config.data.unlabeled_batch_size * min(per_view, cells)


def feature_dim(config) -> int:
  """Width of the DC-loss features: the projector's output, or without the
  projector (an ablation) the decoder's own 256 channels."""
  return config.model.proj_dim if config.model.projector else HEAD_CHANNELS


def bank_capacity(config) -> int:
  if config.cac.supervised_only:
    return 0
  return bank_lib.bank_capacity(config.cac.bank_steps, negatives_per_step(config))


def make_init_fn(model, tx, config):
  """Returns init(key) -> TrainState, pure and jittable."""
  crop = config.data.crop_size

  def init(key):
    x = jnp.zeros((1, crop, crop, 3), jnp.float32)
    variables = model.init({'params': key, 'dropout': key}, x, train=False)
    params = variables['params']
    capacity = bank_capacity(config)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get('batch_stats', {}),
        opt_state=tx.init(params),
        bank=bank_lib.init_bank(capacity, feature_dim(config)) if capacity else None)
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


def abstract_state(model, tx, config, mesh):
  """ShapeDtypeStructs with shardings: the restore target for orbax."""
  init = make_init_fn(model, tx, config)
  abstract = jax.eval_shape(init, jax.random.key(0))
  rep = sharding.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)
