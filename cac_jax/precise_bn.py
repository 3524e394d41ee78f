"""Where evaluation's BatchNorm statistics come from (`config.bn`, docs/method.md §5).

Evaluation normalises with the running statistics that train-mode passes
update. A CAC step makes three (labeled, view 1, view 2), so with the
authors' threading ('all') two thirds of the updates come from
photometrically augmented unlabeled views. `config.bn.running_stats`:

* 'all': every pass updates them, in that order (the authors);
* 'labeled': only the labeled pass does (`train_step` keeps its result and
  drops the views' updates; the views still normalise with their own batch
  statistics, as train mode must);
* 'precise': before each evaluation and each checkpoint save, every layer's
  statistics are re-estimated here from `config.bn.precise_batches`
  train-mode passes over un-augmented labeled training images
  (`pipeline.bn_stats_iterator`), as Detectron2's and pycls's "precise BN":
  mean = the mean over batches of the batch means, var = the mean over
  batches of (unbiased batch var + batch mean^2) - mean^2 (pycls). The
  passes are train mode, dropout included, as the running averages see
  training; each layer's input comes from earlier layers normalised with
  batch statistics. The estimate reads nothing of the previous statistics,
  so it is a function of the parameters alone, and the checkpoint holds
  exactly the statistics that were scored.

Sharded like training: the images are a global batch on 'data' (each host
feeds its own rows, `sharding.to_global`), so every batch statistic is a
reduction over the global batch (SyncBN); the result is replicated.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cac_jax import sharding
from cac_jax.models import layers

# Folded into config.seed for the estimation's dropout keys; training's keys
# fold in the step, which never gets this far.
_DROPOUT_STREAM = 2**31 - 1


def _map_layers(fn, tree):
  """`fn({'mean', 'var'})` applied to every BatchNorm layer of a batch_stats tree."""
  if isinstance(tree, Mapping) and set(tree) == {'mean', 'var'}:
    return fn(tree)
  return {k: _map_layers(fn, v) for k, v in tree.items()}


def batch_moments(model, params, batch_stats, images, key):
  """Per BN layer {'mean': batch mean, 'var': unbiased batch var}, one train-mode pass.

  What each layer's running-average update adds: the pass starts from zero
  statistics, so a layer returns (1 - momentum) x its batch mean and
  unbiased variance (`layers.BatchNorm`), and dividing by that factor gives
  them back to within an ulp. Reading them off the update, rather than
  recomputing them, keeps them the layer's own (global over the sharded
  batch, unbiased where training's are). `batch_stats` gives the structure
  only; its values are never read.
  """
  zeros = jax.tree.map(jnp.zeros_like, batch_stats)
  _, mutated = model.apply(
    {'params': params, 'batch_stats': zeros},
    images,
    train=True,
    rngs={'dropout': key},
    mutable=['batch_stats'],
  )
  return jax.tree.map(lambda x: x / (1 - layers.BN_MOMENTUM), mutated['batch_stats'])


def pool(moments: list) -> dict:
  """Per layer: mean = E[batch mean], var = E[unbiased var + batch mean^2] - mean^2.

  pycls's formula, in its two-pass form E[var] + E[(batch mean - mean)^2]
  (the same number; no cancellation where the mean is large against the
  spread). E is the mean over the batches.
  """
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *moments)

  def layer(s):
    mean = jnp.mean(s['mean'], axis=0)
    var = jnp.mean(s['var'], axis=0) + jnp.mean(jnp.square(s['mean'] - mean), axis=0)
    return {'mean': mean, 'var': var}

  return _map_layers(layer, stacked)


def make_estimate_fns(model, mesh, seed: int):
  """(moments_fn, pool_fn), jitted.

  moments_fn(params, batch_stats, images, index): `batch_moments` of one
  global batch of images (sharded on 'data'), its dropout key folded from
  (seed, index); replicated output. pool_fn(list of moments) -> batch_stats.
  """

  def moments(params, batch_stats, images, index):
    # The key is made inside the jit (from Python ints and the index): no
    # host-side key array to place on a multi-host mesh.
    base = jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM)
    return batch_moments(model, params, batch_stats, images, jax.random.fold_in(base, index))

  rep = sharding.replicated(mesh)
  return jax.jit(moments, out_shardings=rep), jax.jit(pool, out_shardings=rep)


def estimate(fns, params, batch_stats, batches, mesh):
  """Re-estimated batch_stats from an iterable of host batches {'image'}.

  Every host passes its own rows of the same global batches (multi-host);
  nothing is fetched to the host.
  """
  moments_fn, pool_fn = fns
  moments = [
    moments_fn(params, batch_stats, sharding.to_global(b['image'], mesh), np.int32(i))
    for i, b in enumerate(batches)
  ]
  if not moments:
    raise ValueError('no batches to estimate the BatchNorm statistics from')
  return pool_fn(moments)


class Reestimator:
  """The training loop's one call: `state = reestimator.maybe_reestimate(state)`.

  With `config.bn.running_stats` 'precise', returns `state` with its
  batch_stats re-estimated from `config.bn.precise_batches` batches of
  `pipeline.bn_stats_iterator`; otherwise `state` itself. Called before each
  evaluation and each save, so a checkpoint holds the statistics that were
  scored; a second call on the state it returned (an evaluation and a save
  at one step) returns it as it is. The running averages that training
  keeps updating in between are never read: each estimate starts afresh.
  """

  def __init__(self, config, model, mesh):
    self.enabled = config.bn.running_stats == 'precise'
    self._config, self._mesh = config, mesh
    self._fns = make_estimate_fns(model, mesh, int(config.seed)) if self.enabled else None
    self._last = None

  def maybe_reestimate(self, state):
    if not self.enabled or state is self._last:
      return state
    from cac_jax.data import pipeline  # TF only where data is needed

    batches = pipeline.bn_stats_iterator(
      self._config, num_batches=int(self._config.bn.precise_batches)
    )
    stats = estimate(self._fns, state.params, state.batch_stats, batches, self._mesh)
    self._last = state.replace(batch_stats=stats)
    return self._last
