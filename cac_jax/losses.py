"""Losses: pixel cross-entropy and the directional contrastive (DC) loss.

The DC loss (docs/method.md §4) is InfoNCE between a view's stride-8 features
("anchors") and the other view's features at the same image location
("targets", no gradient), against negatives with a different pseudo-label.

The negative term is the chunked log-sum-exp of `cac_jax/negative_lse.py`
(memory, cost and numerical stability are explained there).

Diagnostics. `dc_direction` also returns means over the active anchors that
tell whether the term learns (docs/method.md §4, "Diagnostics"). An anchor's
sums over its valid negatives depend on a negative only through its
pseudo-label, so they come from class histograms of the negatives in
O((N + K)·D), not from a second pass over the [N, K] logits; the loss and its
gradient are computed exactly as without them.

Nothing here imports TensorFlow.
"""

import jax
import jax.numpy as jnp
from jax import lax

from cac_jax import constants
from cac_jax import overlap as overlap_lib
from cac_jax.negative_lse import (
  DEFAULT_ANCHOR_BLOCK,
  LseConfig,
  anchor_block_rows,
  negative_lse,
  resolve_matmul_dtype,
  shift_mode,
)

# Label of pixels and stride-8 cells without a (true) class.
IGNORE_LABEL = constants.IGNORE_LABEL


def cross_entropy(logits, labels, ignore_index=255):
  """Mean pixel cross-entropy over non-ignored pixels.

  Matches `torch.nn.CrossEntropyLoss(ignore_index=ignore_index)`; returns 0
  (not NaN) and zero gradients when no pixel is valid.

  Args:
    logits: [B, H, W, K] any float dtype; computed in float32.
    labels: int [B, H, W], values in [0, K) or `ignore_index`.
    ignore_index: label value that contributes nothing.

  Returns:
    float32 scalar.
  """
  if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
    raise ValueError(
      f'cross_entropy expects logits [..., K] and labels [...] with the same '
      f'leading shape; got {logits.shape} and {labels.shape}.'
    )
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  valid = labels != ignore_index
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  picked = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  count = jnp.sum(valid)
  total = -jnp.sum(jnp.where(valid, picked, 0.0))
  return total / jnp.maximum(count, 1).astype(jnp.float32)


def contrastive_weights(anchor_conf, target_conf, valid, *, pos_threshold, directional):
  """w_k = valid_k · [target_conf_k > γ] · [anchor_conf_k < target_conf_k].

  `pos_threshold` = γ = 0 drops the threshold factor; `directional=False`
  drops the last one. Returns float32 [N].
  """
  w = jnp.asarray(valid, bool)
  if pos_threshold > 0:
    w = w & (target_conf > pos_threshold)
  if directional:
    w = w & (anchor_conf < target_conf)
  return w.astype(jnp.float32)


def _check_flat_inputs(
  anchor,
  target,
  anchor_conf,
  target_conf,
  anchor_label,
  valid,
  neg_feats,
  neg_labels,
  neg_valid,
  temperature,
  chunk_size,
):
  n, d = anchor.shape if anchor.ndim == 2 else (None, None)
  if n is None or target.shape != anchor.shape:
    raise ValueError(
      f'anchor and target must both be [N, D]; got {anchor.shape} and {target.shape}.'
    )
  for name, x in (
    ('anchor_conf', anchor_conf),
    ('target_conf', target_conf),
    ('anchor_label', anchor_label),
    ('valid', valid),
  ):
    if x.shape != (n,):
      raise ValueError(f'{name} must be [N] = [{n}]; got {x.shape}.')
  k = neg_feats.shape[0] if neg_feats.ndim == 2 else None
  if k is None or neg_feats.shape[1] != d:
    raise ValueError(f'neg_feats must be [K, D] with D = {d}; got {neg_feats.shape}.')
  if neg_labels.shape != (k,) or neg_valid.shape != (k,):
    raise ValueError(
      f'neg_labels and neg_valid must be [K] = [{k}]; got {neg_labels.shape} and {neg_valid.shape}.'
    )
  if not temperature > 0:
    raise ValueError(f'temperature must be > 0; got {temperature}.')
  if int(chunk_size) < 1:
    raise ValueError(f'chunk_size must be >= 1; got {chunk_size}.')


def _ratio(num, den):
  """num / den, and 0 where den = 0 (a diagnostic with nothing to average).

  Every denominator here is a count (a sum of 0/1 weights), so max(den, 1)
  changes nothing else.
  """
  return num / jnp.maximum(den, 1.0)


def _negative_sums(
  anchor, anchor_label, neg_feats, neg_labels, neg_valid, *, num_classes, filter_negatives
):
  """Per anchor, M_k = Σ_j m_kj and V_k = Σ_j m_kj n_j, without an [N, K] pass.

  The mask m_kj = valid_j [label_j ≠ y_k] depends on j only through label_j,
  so these sums are the totals over the valid negatives minus the part of the
  anchor's own class: M_k = M − H[y_k], V_k = S − S_c[y_k], with the class
  histogram H and class sums S_c of the negatives: O((N + K) D) work beside
  the loss's O(N K D). (Without filtering, M_k = M and V_k = S.) Returns
  (M_k [N], <a_k, V_k> [N]), float32; counts are exact below 2^24.
  """
  valid = jnp.asarray(neg_valid, jnp.float32)
  total = jnp.sum(valid)
  vsum = jnp.sum(neg_feats * valid[:, None], axis=0)  # [D]
  if not filter_negatives:
    return jnp.broadcast_to(total, anchor_label.shape), anchor @ vsum
  labels = neg_labels.astype(jnp.int32)
  hist = jax.ops.segment_sum(valid, labels, num_segments=num_classes)  # [C]
  class_sum = jax.ops.segment_sum(
    neg_feats * valid[:, None], labels, num_segments=num_classes
  )  # [C, D]
  own = jnp.clip(anchor_label, 0, num_classes - 1)
  return (total - hist[own], jnp.sum(anchor * (vsum[None, :] - class_sum[own]), axis=-1))


def _true_index(true, num_classes):
  """True classes as bins [0, C], C = unknown (255 or out of range)."""
  true = true.astype(jnp.int32)
  return jnp.where((true >= 0) & (true < num_classes), true, num_classes)


def _false_negative_sums(
  anchor_label, anchor_true, neg_labels, neg_valid, neg_true, *, num_classes, filter_negatives
):
  """Per anchor, (#valid negatives of known true class, # of them of class t_k).

  As `_negative_sums`, from a joint histogram J[label, true] of the valid
  negatives: Σ_j m_kj [u_j = t] = T[t] − J[y_k, t] (T = Σ_label J), and the
  known ones are T[:C].sum() − J[y_k, :C].sum(). Anchors of unknown class get
  garbage in the second output; callers weight them out.
  """
  c = num_classes
  valid = jnp.asarray(neg_valid, jnp.float32)
  labels = jnp.clip(neg_labels.astype(jnp.int32), 0, c - 1)
  joint = jax.ops.segment_sum(
    valid, labels * (c + 1) + _true_index(neg_true, c), num_segments=c * (c + 1)
  ).reshape(c, c + 1)
  by_true = jnp.sum(joint, axis=0)  # [C + 1]
  t = jnp.minimum(_true_index(anchor_true, c), c - 1)
  known, same = jnp.sum(by_true[:c]), by_true[t]
  if not filter_negatives:
    return jnp.broadcast_to(known, t.shape), same
  own = jnp.clip(anchor_label, 0, c - 1)
  return (known - jnp.sum(joint[:, :c], axis=1)[own], same - joint[own, t])


def dc_direction(
  anchor,
  target,
  anchor_conf,
  target_conf,
  anchor_label,
  valid,
  neg_feats,
  neg_labels,
  neg_valid,
  *,
  temperature,
  pos_threshold,
  directional,
  filter_negatives,
  chunk_size,
  matmul_dtype,
  anchor_block=DEFAULT_ANCHOR_BLOCK,
  shift='positive',
  num_classes=None,
  target_label=None,
  anchor_true=None,
  target_true=None,
  neg_true=None,
):
  """One direction of the DC loss with its weights and diagnostics.

  The loss and its gradient are those of `directional_contrastive_loss`
  (same arguments, same code). With `num_classes` (the number of pseudo-label
  values; labels must lie in [0, C)), also the diagnostics below, means over
  the active anchors (w_k = 1), 0 when none is active (docs/method.md §4,
  "Diagnostics"). They need no second pass over the [N, K] similarities: the
  per-anchor sums over its valid negatives follow from class histograms of
  the negatives (`_negative_sums`). M_k = Σ_j m_kj counts the valid negatives
  (another pseudo-label than the anchor's; all of them without
  `filter_negatives`).

    valid_negatives  Σ w M / Σ w
    loss_gap         Σ w (log(1 + M) − l) / Σ w; log(1 + M_k) is l_k when all
                     of the anchor's logits are equal (features that tell
                     nothing apart), so 0 = uninformative, larger = better
    cos_pos          Σ w cos(a, t) / Σ w
    cos_neg          Σ_k w_k Σ_j m_kj cos(a_k, n_j) / Σ_k w_k M_k (pooled
                     over the valid (anchor, negative) pairs)

  and with the true classes (`anchor_true` etc.; IGNORE_LABEL = unknown;
  only the active anchors of known class count):

    anchor_label_acc  share with anchor_label = anchor_true
    target_label_acc  share with target_label = target_true (the target
                      view's pseudo-label at the same location; active
                      anchors whose target's class is known)
    false_neg_rate    share of their valid negatives of known class whose
                      class is the anchor's (pooled over pairs)

  Args:
    anchor ... shift: as `directional_contrastive_loss`.
    num_classes: static C; None: no diagnostics (`diag` is {}).
    target_label: int [N] the target's pseudo-label; with the true classes.
    anchor_true, target_true: int [N]; neg_true: int [K] true classes, or all
      None (no ground-truth diagnostics).

  Returns:
    (loss, w, diag): float32 scalar, float32 [N] weights, dict of float32
    scalars (no gradient).
  """
  _check_flat_inputs(
    anchor,
    target,
    anchor_conf,
    target_conf,
    anchor_label,
    valid,
    neg_feats,
    neg_labels,
    neg_valid,
    temperature,
    chunk_size,
  )
  truth = (target_label, anchor_true, target_true, neg_true)
  if any(x is not None for x in truth) and any(x is None for x in truth):
    raise ValueError(
      'target_label, anchor_true, target_true and neg_true go together: give all four or none.'
    )
  truth = neg_true is not None and num_classes is not None
  if truth:
    n, k = anchor.shape[0], neg_feats.shape[0]
    for name, x, size in (
      ('target_label', target_label, n),
      ('anchor_true', anchor_true, n),
      ('target_true', target_true, n),
      ('neg_true', neg_true, k),
    ):
      if x.shape != (size,):
        raise ValueError(f'{name} must be [{size}]; got {x.shape}.')
  inv_t = 1.0 / float(temperature)
  cfg = LseConfig(
    inv_temperature=inv_t,
    chunk_size=int(chunk_size),
    filter_negatives=bool(filter_negatives),
    shift=shift_mode(shift, inv_t),
    matmul_dtype=resolve_matmul_dtype(matmul_dtype),
    anchor_block=anchor_block_rows(anchor_block, anchor.shape[0]),
  )
  anchor = anchor.astype(jnp.float32)
  target = lax.stop_gradient(target.astype(jnp.float32))
  pos = jnp.sum(anchor * target, axis=-1) * inv_t  # [N]
  anchor_label = lax.stop_gradient(anchor_label).astype(jnp.int32)
  neg_feats = lax.stop_gradient(neg_feats.astype(jnp.float32))
  neg_valid = jnp.asarray(neg_valid, bool)
  w = lax.stop_gradient(
    contrastive_weights(
      anchor_conf, target_conf, valid, pos_threshold=pos_threshold, directional=directional
    )
  )
  lse = negative_lse(
    anchor, pos, anchor_label, neg_feats, neg_labels.astype(jnp.int32), neg_valid, w > 0, cfg
  )
  per_anchor = lse - pos  # −log softmax of the positive, ≥ 0, finite
  loss = jnp.sum(w * per_anchor) / (jnp.sum(w) + 1e-12)
  if num_classes is None:
    return loss, w, {}

  c = int(num_classes)
  sg = lax.stop_gradient
  a = sg(anchor)
  num_neg, dot_neg = _negative_sums(
    a,
    anchor_label,
    neg_feats,
    neg_labels,
    neg_valid,
    num_classes=c,
    filter_negatives=filter_negatives,
  )
  active = jnp.sum(w)
  mean = lambda x: _ratio(jnp.sum(w * x), active)
  diag = {
    'valid_negatives': mean(num_neg),
    'loss_gap': mean(jnp.log1p(num_neg) - sg(per_anchor)),
    'cos_pos': mean(jnp.sum(a * target, axis=-1)),
    'cos_neg': _ratio(jnp.sum(w * dot_neg), jnp.sum(w * num_neg)),
  }
  if truth:
    anchor_true, target_true = (sg(x).astype(jnp.int32) for x in (anchor_true, target_true))
    known_neg, same_neg = _false_negative_sums(
      anchor_label,
      anchor_true,
      neg_labels,
      neg_valid,
      neg_true,
      num_classes=c,
      filter_negatives=filter_negatives,
    )
    w_a = w * (_true_index(anchor_true, c) < c)
    w_t = w * (_true_index(target_true, c) < c)
    diag.update(
      anchor_label_acc=_ratio(jnp.sum(w_a * (anchor_label == anchor_true)), jnp.sum(w_a)),
      target_label_acc=_ratio(
        jnp.sum(w_t * (sg(target_label).astype(jnp.int32) == target_true)), jnp.sum(w_t)
      ),
      false_neg_rate=_ratio(jnp.sum(w_a * same_neg), jnp.sum(w_a * known_neg)),
    )
  return loss, w, diag


def directional_contrastive_loss(
  anchor,
  target,
  anchor_conf,
  target_conf,
  anchor_label,
  valid,
  neg_feats,
  neg_labels,
  neg_valid,
  *,
  temperature=0.1,
  pos_threshold=0.75,
  directional=True,
  filter_negatives=True,
  chunk_size=8192,
  matmul_dtype='auto',
  anchor_block=DEFAULT_ANCHOR_BLOCK,
  shift='positive',
):
  """One direction of the DC loss on flat arrays (docs/method.md §4).

  loss = Σ_k w_k l_k / (Σ_k w_k + 1e-12) with
  l_k = −log(exp(pos_k) / (exp(pos_k) + Σ_j m_kj exp(s_kj))),
  pos_k = <a_k, sg(t_k)>/τ, s_kj = <a_k, sg(n_j)>/τ,
  m_kj = neg_valid_j · [neg_labels_j ≠ anchor_label_k] (the label factor only
  with `filter_negatives`), and w from `contrastive_weights`.

  Args:
    anchor: [N, D] unit-norm features; the only input that gets a gradient.
    target: [N, D] unit-norm features at the same locations (stop-gradient).
    anchor_conf, target_conf: [N] classifier confidences (max softmax).
    anchor_label: int [N] the anchor's pseudo-label.
    valid: bool [N] anchors that exist (inside the overlap).
    neg_feats: [K, D] unit-norm negatives (stop-gradient); K may be 0 and
      need not be a multiple of `chunk_size`.
    neg_labels: int [K]; neg_valid: bool [K].
    temperature: τ > 0.
    pos_threshold: γ; 0 disables positive filtering.
    directional: keep only anchors less confident than their target.
    filter_negatives: drop negatives with the anchor's pseudo-label.
    chunk_size: negatives per loop step; peak memory ~ 2·N·chunk_size floats.
    matmul_dtype: dtype of the matmul operands (accumulation is float32):
      'float32' (HIGHEST precision), 'bfloat16' (~15x the matmul rate of
      that on TPU/GPU tensor cores, at ~0.004·(1/τ) logit error for
      random unit vectors, tests/test_dc_fast.py), or 'auto' = bfloat16 on
      accelerators and float32 on CPU (`resolve_matmul_dtype`).
    anchor_block: score only the anchors with w_k > 0, in blocks of this
      fraction of N (`negative_lse._active_rows`); 0 scores every anchor (the dense path).
      The same loss and gradient either way, up to float32 rounding.
    shift: 'positive' (each anchor's log-sum-exp shifted by its positive
      logit) or 'static' (by 1/τ, the largest logit of unit-norm features);
      both exact-stable, an online max takes over for small τ.

  Returns:
    float32 scalar. Differentiable in `anchor` only.
  """
  loss, _, _ = dc_direction(
    anchor,
    target,
    anchor_conf,
    target_conf,
    anchor_label,
    valid,
    neg_feats,
    neg_labels,
    neg_valid,
    temperature=temperature,
    pos_threshold=pos_threshold,
    directional=directional,
    filter_negatives=filter_negatives,
    chunk_size=chunk_size,
    matmul_dtype=matmul_dtype,
    anchor_block=anchor_block,
    shift=shift,
  )
  return loss


def _confidence_and_label(logits):
  """Max-softmax confidence and argmax pseudo-label, float32/int32 [...]."""
  logits = lax.stop_gradient(logits.astype(jnp.float32))
  conf = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
  return conf, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _sample_cells(key, maps, num):
  """`num` distinct random cells of each map: [B, V, hw, ...] -> [B, V, num, ...]."""
  b, v, hw = maps[0].shape[:3]
  scores = jax.random.uniform(key, (b, v, hw))
  _, idx = lax.top_k(scores, num)  # [B, V, num], distinct within each map
  return [
    jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 3)), axis=2) for x in maps
  ]


# Name scope of every op of `dc_loss_from_views`, forward and backward (the
# HLO op_name then holds 'dc_loss'): a profile attributes them to the loss.
DC_SCOPE = 'dc_loss'


# The fields of the config's `cac` block that `dc_loss_from_views` takes as
# keywords: the training step and the step benchmark pass the same ones.
DC_OPTIONS = (
  'temperature',
  'pos_threshold',
  'directional',
  'filter_negatives',
  'neg_per_image',
  'chunk_size',
  'matmul_dtype',
  'anchor_block',
)


def dc_options(cac) -> dict:
  """{keyword: value} of `dc_loss_from_views`'s options from a config's `cac` block."""
  return {name: getattr(cac, name) for name in DC_OPTIONS}


@jax.named_scope(DC_SCOPE)
def dc_loss_from_views(
  proj1,
  proj2,
  logits1,
  logits2,
  box1,
  box2,
  flip1,
  flip2,
  bank_feats,
  bank_labels,
  bank_valid,
  *,
  key,
  temperature,
  pos_threshold,
  directional,
  filter_negatives,
  neg_per_image=0,
  chunk_size=8192,
  matmul_dtype='auto',
  anchor_block=DEFAULT_ANCHOR_BLOCK,
  shift='positive',
  diagnostics=True,
  truth1=None,
  truth2=None,
):
  """The full DC loss L_1→2 + L_2→1 of a batch of unlabeled view pairs.

  Args:
    proj1, proj2: [B, h, w, D] unit-norm stride-8 projected features of view
      1 / 2, in the frame of the (possibly flipped) view image.
    logits1, logits2: [B, h, w, K] stride-8 classifier logits, same frame.
    box1, box2: int32 [B, 4] overlap boxes (top, left, bottom, right) in
      pixels of each view's UNFLIPPED frame; multiples of 8, equal sizes.
    flip1, flip2: bool [B], True where the view image was flipped.
    bank_feats: [C, D] float32; bank_labels: int [C]; bank_valid: bool [C]
      negatives of previous steps (C may be 0).
    key: PRNG key for `neg_per_image` sub-sampling (may be None when 0).
    temperature, pos_threshold, directional, filter_negatives, chunk_size,
      matmul_dtype, anchor_block, shift: see `directional_contrastive_loss`.
    neg_per_image: random cells per view per image used as negatives;
      0 = all h·w cells.
    diagnostics: also return the DC diagnostics (`dc_direction`: O((N + K) D)
      work from class histograms, beside the loss's O(N K D)); the loss and
      its gradient are the same either way.
    truth1, truth2: optional int [B, h, w] true class of each stride-8 cell of
      view 1 / 2 (IGNORE_LABEL = unknown), in the frame of the view image like
      the logits (`pairs.cell_labels`). For diagnostics only: they never
      touch the loss. Negatives from the bank have no true class (the bank
      keeps none), so the false-negative rate counts this step's negatives.

  Returns:
    (loss, aux): loss is a float32 scalar; aux has float32 scalars
    'loss_12', 'loss_21', 'active_frac_12', 'active_frac_21' (fraction of
    overlap cells with w = 1), 'overlap_frac' (overlap cells / all cells),
    this step's negatives 'new_neg_feats' float32 [M, D], 'new_neg_labels'
    int32 [M], M = 2·B·(neg_per_image or h·w), to push into the bank, and
    'diagnostics': {} or a dict of float32 scalars named as the train
    metrics, 'dc_<name>_12' and 'dc_<name>_21' for each name of
    `dc_direction` (the ground-truth ones only with truth1/truth2).
  """
  if proj1.ndim != 4 or proj1.shape != proj2.shape:
    raise ValueError(
      f'proj1 and proj2 must both be [B, h, w, D]; got {proj1.shape} and {proj2.shape}.'
    )
  b, h, w, d = proj1.shape
  for name, x in (('logits1', logits1), ('logits2', logits2)):
    if x.ndim != 4 or x.shape[:3] != (b, h, w):
      raise ValueError(f'{name} must be [B, h, w, K] = [{b}, {h}, {w}, K]; got {x.shape}.')
  if bank_feats.ndim != 2 or bank_feats.shape[1] != d:
    raise ValueError(f'bank_feats must be [C, {d}]; got {bank_feats.shape}.')
  hw = h * w
  if not 0 <= neg_per_image <= hw:
    raise ValueError(f'neg_per_image must be in [0, h*w = {hw}]; got {neg_per_image}.')
  if neg_per_image and key is None:
    raise ValueError('neg_per_image > 0 needs a PRNG key (key=...).')
  if (truth1 is None) != (truth2 is None):
    raise ValueError('truth1 and truth2 go together: give both or neither.')
  with_truth = truth1 is not None and diagnostics
  if with_truth:
    for name, x in (('truth1', truth1), ('truth2', truth2)):
      if x.shape != (b, h, w):
        raise ValueError(
          f'{name} must be [B, h, w] = [{b}, {h}, {w}] (the stride-8 cell grid); got {x.shape}.'
        )

  # Pseudo-labels and confidences (no gradient), everything in the unflipped
  # frame so that the boxes apply.
  conf1, label1 = _confidence_and_label(logits1)
  conf2, label2 = _confidence_and_label(logits2)
  feats1 = overlap_lib.unflip(proj1.astype(jnp.float32), flip1).reshape(b, hw, d)
  feats2 = overlap_lib.unflip(proj2.astype(jnp.float32), flip2).reshape(b, hw, d)
  conf1 = overlap_lib.unflip(conf1, flip1).reshape(b, hw)
  conf2 = overlap_lib.unflip(conf2, flip2).reshape(b, hw)
  label1 = overlap_lib.unflip(label1, flip1).reshape(b, hw)
  label2 = overlap_lib.unflip(label2, flip2).reshape(b, hw)

  # Cell k of view 1 <-> cell index2[k] of view 2 (valid inside the overlap).
  valid, index2 = overlap_lib.batched_overlap_index_map(box1, box2, (h, w))
  gather2 = lambda x: jnp.take_along_axis(
    x, index2.reshape(index2.shape + (1,) * (x.ndim - 2)), axis=1
  )
  feats2_at, conf2_at, label2_at = gather2(feats2), gather2(conf2), gather2(label2)
  if with_truth:
    true1, true2 = (
      overlap_lib.unflip(lax.stop_gradient(x).astype(jnp.int32), f).reshape(b, hw)
      for x, f in ((truth1, flip1), (truth2, flip2))
    )
    true2_at = gather2(true2)

  # Negatives: this step's cells of both views of every image (no gradient),
  # then the bank.
  view_feats = jnp.stack([feats1, feats2], axis=1)  # [B, 2, hw, D]
  view_labels = jnp.stack([label1, label2], axis=1)  # [B, 2, hw]
  view_maps = [view_feats, view_labels]
  if with_truth:  # sampled with the same cells as the features
    view_maps.append(jnp.stack([true1, true2], axis=1))
  if neg_per_image and neg_per_image < hw:
    view_maps = _sample_cells(key, view_maps, neg_per_image)
  view_feats, view_labels = view_maps[:2]
  new_feats = lax.stop_gradient(view_feats.reshape(-1, d))
  new_labels = view_labels.reshape(-1)
  neg_feats = jnp.concatenate([new_feats, bank_feats.astype(jnp.float32)])
  neg_labels = jnp.concatenate([new_labels, bank_labels.astype(jnp.int32)])
  neg_valid = jnp.concatenate([jnp.ones(new_labels.shape, bool), jnp.asarray(bank_valid, bool)])
  neg_true = (
    None
    if not with_truth
    else jnp.concatenate(
      [view_maps[2].reshape(-1), jnp.full(bank_labels.shape, IGNORE_LABEL, jnp.int32)]
    )
  )

  flat = lambda x: x.reshape((b * hw,) + x.shape[2:])
  valid = flat(valid)
  kwargs = dict(
    temperature=temperature,
    pos_threshold=pos_threshold,
    directional=directional,
    filter_negatives=filter_negatives,
    chunk_size=chunk_size,
    matmul_dtype=matmul_dtype,
    anchor_block=anchor_block,
    shift=shift,
    num_classes=logits1.shape[-1] if diagnostics else None,
  )
  truth_12 = truth_21 = {}
  if with_truth:
    truth_12 = dict(
      target_label=flat(label2_at),
      anchor_true=flat(true1),
      target_true=flat(true2_at),
      neg_true=neg_true,
    )
    truth_21 = dict(
      target_label=flat(label1),
      anchor_true=flat(true2_at),
      target_true=flat(true1),
      neg_true=neg_true,
    )
  loss_12, w_12, diag_12 = dc_direction(
    flat(feats1),
    flat(feats2_at),
    flat(conf1),
    flat(conf2_at),
    flat(label1),
    valid,
    neg_feats,
    neg_labels,
    neg_valid,
    **kwargs,
    **truth_12,
  )
  loss_21, w_21, diag_21 = dc_direction(
    flat(feats2_at),
    flat(feats1),
    flat(conf2_at),
    flat(conf1),
    flat(label2_at),
    valid,
    neg_feats,
    neg_labels,
    neg_valid,
    **kwargs,
    **truth_21,
  )
  num_overlap = jnp.sum(valid).astype(jnp.float32)
  denom = jnp.maximum(num_overlap, 1.0)
  aux = {
    'loss_12': loss_12,
    'loss_21': loss_21,
    'active_frac_12': jnp.sum(w_12) / denom,
    'active_frac_21': jnp.sum(w_21) / denom,
    'overlap_frac': num_overlap / (b * hw),
    'new_neg_feats': new_feats,
    'new_neg_labels': new_labels,
    'diagnostics': {
      f'dc_{name}_{direction}': value
      for direction, diag in (('12', diag_12), ('21', diag_21))
      for name, value in diag.items()
    },
  }
  return loss_12 + loss_21, aux
