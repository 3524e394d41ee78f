"""One CAC update: a pure function of (state, batch), jitted once.

    labeled  -> model -> CE
    view 1   -> model -> stride-8 projected features, logits   \
    view 2   -> model -> stride-8 projected features, logits   -> DC loss (both directions)
    negatives = this step's cells of both views (global batch) + feature bank
    grads -> SGD -> new params; bank <- this step's negatives

The three passes are separate model calls, each normalising with its own
batch statistics (global over the sharded batch, i.e. SyncBN), as the authors
do. What the running BN statistics keep is `config.bn.running_stats`
(`cac_jax/precise_bn.py`): 'all' (the authors) threads them through the
passes in that order; 'labeled' keeps the labeled pass's update only, the
views' updates dropped; 'precise' threads them as 'all' here and the loop
replaces them with a fresh estimate before evaluating or saving.

With `cac.fused_passes` (`fused_passes`) the three passes are one model call
on the stacked batch [labeled; view 1; view 2] inside `layers.batch_groups`:
each group is normalised with its own (global) batch statistics, the running
statistics take the groups' updates in the same order (or the labeled one's
alone), and each group's dropout masks come from its own key, the masks the
separate calls draw. Same step up to float summation order; one call of 3B
keeps an accelerator far busier than three of B.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from cac_jax import bank as bank_lib
from cac_jax import losses
from cac_jax.models import layers
from cac_jax.sharding import DATA_AXIS
from cac_jax.train_state import TrainState


def _forward(model, params, batch_stats, images, key, dc_outputs):
  out, mutated = model.apply(
    {'params': params, 'batch_stats': batch_stats},
    images,
    train=True,
    dc_outputs=dc_outputs,
    rngs={'dropout': key},
    mutable=['batch_stats'],
  )
  return out, mutated['batch_stats']


def fused_passes(cac_config) -> bool:
  """Whether the DC step runs its three passes as one call (`cac.fused_passes`).

  'auto': on GPU/TPU (one large call fills the chip), off on CPU, where the
  step benchmark measures no gain (`python -m cac_jax.bench.step_time
  --modes=cac --fused-passes=on`, against `=off`). The step also needs the
  labeled and unlabeled batches to have one shape (`_fusable`).
  """
  value = getattr(cac_config, 'fused_passes', 'auto')  # a config from before it: auto
  if value == 'auto':
    return jax.default_backend() != 'cpu'
  if value not in ('on', 'off'):
    raise ValueError(f"cac.fused_passes={value!r} must be 'auto', 'on' or 'off'")
  return value == 'on'


def _fusable(cac_config, labeled, unlabeled) -> bool:
  """Fused passes if configured and the three batches have one shape.

  'auto' falls back to three passes when the labeled and unlabeled batch
  sizes differ; 'on' says why it cannot.
  """
  if not fused_passes(cac_config):
    return False
  shapes = {labeled['image'].shape, unlabeled['image1'].shape, unlabeled['image2'].shape}
  if len(shapes) == 1:
    return True
  if getattr(cac_config, 'fused_passes', 'auto') == 'on':
    raise ValueError(
      f'cac.fused_passes=on stacks the labeled and unlabeled batches, which need one '
      f'shape; got {sorted(shapes)}: use equal batch sizes or cac.fused_passes=auto/off'
    )
  return False


def _data_shards(rows: int) -> int:
  """Devices the batch's leading axis is split over (the mesh being traced under)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names:
    return 1
  shards = mesh.shape[DATA_AXIS]
  return shards if rows % shards == 0 else 1


def _forward_fused(model, params, batch_stats, images, keys, stat_groups):
  """The three passes as one call: per-group outputs and the threaded statistics."""
  with layers.batch_groups(
    len(images), shards=_data_shards(images[0].shape[0]), stat_groups=stat_groups
  ) as groups:
    out, mutated = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      groups.merge(images),
      train=True,
      dc_outputs=True,
      rngs=layers.group_rngs(keys),
      mutable=['batch_stats'],
    )
  parts = {name: groups.split(value) for name, value in out.items()}
  outs = [{name: parts[name][g] for name in parts} for g in range(len(images))]
  return outs, mutated['batch_stats']


def train_step(state: TrainState, batch, *, model, tx, config, with_dc: bool):
  """Applies one update.

  Args:
    state: the replicated TrainState (donated by the caller's jit).
    batch: global arrays sharded on 'data': batch['labeled'] = {image [B,C,C,3]
      float32 normalised, label [B,C,C] int32}; with `with_dc`, also
      batch['unlabeled'] = {image1, image2 [B,C,C,3], box1, box2 int32 [B,4],
      flip1, flip2 bool [B]} and, where the unlabeled images have masks,
      truth1, truth2 int32 [B,C/8,C/8] (the true class of each stride-8 cell,
      `pairs.cell_labels`): read by the DC diagnostics only, never by a loss.
    model, tx, config: static; closed over by `make_train_step`.
    with_dc: static. False for the supervised-only baseline and for the steps
      before `cac.unsup_start_step` (where the DC weight is zero, so the two
      unlabeled passes would only cost time).

  Returns:
    (new_state, metrics): metrics is a dict of float32 scalars, on device;
    on DC steps they include the DC diagnostics 'dc_*_12' / 'dc_*_21'
    (`losses.dc_direction`, docs/method.md §4), computed in the step.
  """
  cac = config.cac
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  k_lab, k_v1, k_v2, k_neg = jax.random.split(key, 4)
  labeled = batch['labeled']

  fused = with_dc and _fusable(cac, labeled, batch['unlabeled'])

  def loss_fn(params):
    if fused:
      un = batch['unlabeled']
      # 'labeled': the views normalise with their own batch statistics (train
      # mode); only their running-average updates are dropped.
      (out, out1, out2), batch_stats = _forward_fused(
        model,
        params,
        state.batch_stats,
        [labeled['image'], un['image1'], un['image2']],
        [k_lab, k_v1, k_v2],
        stat_groups=1 if config.bn.running_stats == 'labeled' else 3,
      )
    else:
      out, batch_stats = _forward(
        model, params, state.batch_stats, labeled['image'], k_lab, dc_outputs=False
      )
    ce = losses.cross_entropy(out['logits'], labeled['label'])
    metrics = {'loss_ce': ce}
    if not with_dc:
      return ce, (batch_stats, metrics, None)
    un = batch['unlabeled']
    if not fused:
      labeled_stats = batch_stats
      out1, batch_stats = _forward(model, params, batch_stats, un['image1'], k_v1, True)
      out2, batch_stats = _forward(model, params, batch_stats, un['image2'], k_v2, True)
      if config.bn.running_stats == 'labeled':
        # The views normalised with their own batch statistics (train mode);
        # only their running-average updates are dropped.
        batch_stats = labeled_stats
    bank = state.bank or bank_lib.init_bank(0, out1['proj8'].shape[-1])
    dc, aux = losses.dc_loss_from_views(
      out1['proj8'],
      out2['proj8'],
      out1['logits8'],
      out2['logits8'],
      un['box1'],
      un['box2'],
      un['flip1'],
      un['flip2'],
      bank.feats,
      bank.labels,
      bank.valid,
      key=k_neg,
      **losses.dc_options(cac),
      truth1=un.get('truth1'),
      truth2=un.get('truth2'),
    )
    metrics.update(
      loss_dc=dc,
      loss_dc_12=aux['loss_12'],
      loss_dc_21=aux['loss_21'],
      active_frac_12=aux['active_frac_12'],
      active_frac_21=aux['active_frac_21'],
      overlap_frac=aux['overlap_frac'],
      **aux['diagnostics'],
    )
    negatives = (aux['new_neg_feats'], aux['new_neg_labels'])
    return ce + cac.weight * dc, (batch_stats, metrics, negatives)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (batch_stats, metrics, negatives)), grads = grad_fn(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  bank = state.bank
  if bank is not None and negatives is not None:
    bank = bank_lib.push(bank, *negatives)
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads))
  if bank is not None:
    metrics['bank_fill'] = jnp.mean(bank.valid.astype(jnp.float32))
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, bank=bank
  )
  return new_state, jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)


def make_train_step(model, tx, config, state_shardings, *, with_dc: bool):
  """jit(train_step) with the state donated and its sharding pinned."""
  step = functools.partial(train_step, model=model, tx=tx, config=config, with_dc=with_dc)
  return jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, None))
