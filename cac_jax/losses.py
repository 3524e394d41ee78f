"""Losses: pixel cross-entropy and the directional contrastive (DC) loss.

The DC loss (docs/method.md §4) is InfoNCE between a view's stride-8 features
("anchors") and the other view's features at the same image location
("targets", no gradient), against negatives with a different pseudo-label.

Cost. At VOC scale one direction has ~12,800 anchors and ~51,200 negatives of
128-d: the [N, K] similarity matrix would be 2.6 GB in float32, so negatives
are processed in chunks of `chunk_size` with a loop. The backward pass does
NOT replay that loop: a custom VJP accumulates, during the forward loop and
from the same exponentials, the softmax-weighted sum of negatives
Σ_j q_kj n_j ([N, D]), which is exactly what d lse / d anchor needs. So the
whole forward+backward costs two N×K×D matmuls and one N×K exp pass (instead
of three matmuls and two exp passes for autodiff through a rematerialised
scan), and peak memory is O(N·chunk_size + (N + K)·D) for both passes; no
`jax.checkpoint` is needed because the backward pass never revisits a chunk.
(The price: only reverse-mode, first-order derivatives are defined, which is
all training needs.) On CPU, chunks of ~1,024 were fastest (figures in
docs/benchmarks.md, from `python -m cac_jax.bench.dc_loss`); accelerators
prefer larger ones.

Only the anchors with weight w_k > 0 move the loss or its gradient (15-25%
of the overlap cells in VOC steps), so by default only they are scored
(`anchor_block`, `_active_rows`): gathered to the front and looped over in
blocks while a block holds one, with no fixed capacity to overflow; the dense
path (`anchor_block=0`) scores every anchor. Matmul operands are bfloat16 on
accelerators by default (`matmul_dtype='auto'`; float32 at HIGHEST precision
on CPU, where bfloat16 is slow); accumulation and the exponentials are
float32 either way. The pseudo-label filter is a comparison fused into the
exponential (no [N, K] mask is stored); a per-class-sum form
Σ_j e_kj − Σ_{same class} e_kj could give the value but not the gradient's
Σ_j m_kj e_kj n_j, and cancels when the anchor's own class holds the mass
(tests/test_dc_fast.py), so it is not used.

Stability. Logits are <a, n>/τ with unit-norm features, so every logit lies in
[−1/τ, 1/τ]. Each anchor's log-sum-exp is shifted by its own positive logit:
the positive term is then exactly 1 (the sum can never underflow to 0), and a
negative term is at most exp(2/τ). For τ ≥ 1/30 that is ≤ e^60, far from
float32 overflow, so the shift is exact-stable without a running max. For
smaller τ a running (online) max over chunks is kept instead, which is stable
for any logits at the price of one extra reduction per chunk. `shift='static'`
shifts by 1/τ instead, the largest logit: every term then lies in
[e^{−2/τ}, 1], which neither overflows nor (for 2/τ ≤ 80) underflows in
float32 or bfloat16; it costs the same as the positive shift.

Diagnostics. `dc_direction` also returns means over the active anchors that
tell whether the term learns (docs/method.md §4, "Diagnostics"). An anchor's
sums over its valid negatives depend on a negative only through its
pseudo-label, so they come from class histograms of the negatives in
O((N + K)·D), not from a second pass over the [N, K] logits; the loss and its
gradient are computed exactly as without them.

Nothing here imports TensorFlow.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from cac_jax import constants
from cac_jax import overlap as overlap_lib

# Largest logit spread 2/τ for which the fixed per-anchor shift is used:
# e^60 · (1e12 negatives) is still < float32 max (3.4e38).
_MAX_FIXED_SHIFT_SPREAD = 60.0
# Largest spread for the static shift 1/τ: its terms are >= e^{-2/τ}, and
# e^-80 = 1.8e-35 is above the smallest normal float32 and bfloat16 (1.2e-38).
_MAX_STATIC_SHIFT_SPREAD = 80.0
# Shifts of the log-sum-exp (`dc_direction`); both are exact-stable where
# they are used, and an online max takes over beyond their spread.
SHIFTS = ('positive', 'static')
# Default block of active anchors, as a fraction of a direction's anchors
# (cac.anchor_block): VOC steps have 15-25% of the cells active, so one to
# two blocks run.
DEFAULT_ANCHOR_BLOCK = 0.125
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


class _LseConfig(NamedTuple):
  """Static settings of the chunked log-sum-exp (hashable for custom_vjp)."""

  inv_temperature: float
  chunk_size: int
  filter_negatives: bool
  shift: str  # 'positive' | 'static' | 'online' (resolved by `_shift_mode`)
  matmul_dtype: str  # 'float32' | 'bfloat16' (resolved by `resolve_matmul_dtype`)
  anchor_block: int  # rows per block of active anchors; 0 = score every anchor


def _lse_loop(
  anchor, pos, anchor_label, neg_feats, neg_labels, neg_valid, cfg: _LseConfig, with_grad: bool
):
  """Loops over chunks of negatives; see `_negative_lse` for the math.

  Returns (shift [N], acc [N], g [N, D] or None) with
  lse = shift + log(acc), g = Σ_j m_kj exp(s_kj − shift_k) n_j.
  """
  n, d = anchor.shape
  k = neg_feats.shape[0]
  mm_dtype = jnp.dtype(cfg.matmul_dtype)
  # Full float32 products where asked: on TPU/GPU the default precision of a
  # float32 matmul is bf16/tf32, which at 1/τ = 10 is ~0.1 logit of error.
  precision = lax.Precision.HIGHEST if mm_dtype == jnp.float32 else None
  anchor_scaled = (anchor * cfg.inv_temperature).astype(mm_dtype)  # [N, D]
  static = cfg.shift == 'static'

  def update(carry, feats_c, labels_c, valid_c):
    shift, acc, g = carry
    feats_c = feats_c.astype(mm_dtype)  # [C, D]
    s = jnp.dot(
      anchor_scaled, feats_c.T, precision=precision, preferred_element_type=jnp.float32
    )  # [N, C]
    # The label filter is a comparison inside the exponential's fusion: XLA
    # never stores this [N, C] mask (see `_negative_sums` for why the class
    # histogram trick of the diagnostics cannot replace it here).
    mask = valid_c[None, :]
    if cfg.filter_negatives:
      mask = mask & (labels_c[None, :] != anchor_label[:, None])  # [N, C]
    if cfg.shift == 'online':
      new_shift = jnp.maximum(shift, jnp.max(jnp.where(mask, s, -jnp.inf), axis=1))
      rescale = jnp.exp(shift - new_shift)
      acc = acc * rescale
      if g is not None:
        g = g * rescale[:, None]
      shift = new_shift
    offset = cfg.inv_temperature if static else shift[:, None]
    e = jnp.where(mask, jnp.exp(s - offset), 0.0)  # [N, C]
    acc = acc + jnp.sum(e, axis=1)
    if g is not None:
      g = g + jnp.dot(
        e.astype(mm_dtype), feats_c, precision=precision, preferred_element_type=jnp.float32
      )
    return shift, acc, g

  if static:
    # Every logit is <= 1/τ (unit-norm features), so with the shift 1/τ each
    # term exp(s − 1/τ) lies in [e^{−2/τ}, 1]: nothing overflows, and for
    # 2/τ <= _MAX_STATIC_SHIFT_SPREAD nothing underflows either (the
    # positive term included), so the sum keeps float32's relative precision.
    shift = jnp.full((n,), cfg.inv_temperature, jnp.float32)
    acc = jnp.exp(pos - cfg.inv_temperature)
  else:
    # Start with the positive term alone: shift = pos makes it exactly 1.
    shift, acc = pos, jnp.ones((n,), jnp.float32)
  carry = (shift, acc, jnp.zeros((n, d), jnp.float32) if with_grad else None)
  if k == 0:
    return carry
  chunk = min(cfg.chunk_size, k)
  num_chunks = -(-k // chunk)

  def body(i, carry):
    # dynamic_slice of the original arrays: no padded or reshaped copy of the
    # (possibly large) negative set is ever made. When K is not a multiple of
    # the chunk, the last chunk is the last `chunk` negatives; the ones it
    # shares with the previous chunk are masked out. One loop body for all
    # chunks keeps a single [N, chunk] scratch buffer.
    start = jnp.minimum(i * chunk, k - chunk)
    fresh = start + jnp.arange(chunk) >= i * chunk  # [C]
    return update(
      carry,
      lax.dynamic_slice_in_dim(neg_feats, start, chunk, 0),
      lax.dynamic_slice_in_dim(neg_labels, start, chunk, 0),
      lax.dynamic_slice_in_dim(neg_valid, start, chunk, 0) & fresh,
    )

  if num_chunks == 1:
    return update(carry, neg_feats, neg_labels, neg_valid)
  return lax.fori_loop(0, num_chunks, body, carry)


def _lse_rows(anchor, pos, anchor_label, negatives, cfg, with_grad):
  """(lse [N], positive weight [N], softmax-weighted negatives [N, D] or None).

  lse_k = shift_k + log(acc_k); the positive's softmax weight
  exp(pos_k − lse_k) and Σ_j q_kj n_j = g_k / acc_k are what the backward
  pass needs (`_negative_lse_bwd`).
  """
  shift, acc, g = _lse_loop(anchor, pos, anchor_label, *negatives, cfg, with_grad=with_grad)
  lse = shift + jnp.log(acc)
  pos_weight = jnp.exp(pos - shift) / acc
  return lse, pos_weight, None if g is None else g / acc[:, None]


def _active_rows(anchor, pos, anchor_label, active, negatives, cfg, with_grad):
  """`_lse_rows` of the active anchors only, in blocks of `cfg.anchor_block`.

  Only anchors with weight w_k > 0 (`active`) move the loss or its gradient,
  and at VOC scale they are 15-25% of the overlap cells. They are moved to
  the front (a stable sort of the [N] mask, then one [N, D] gather), and a
  while loop scores blocks of them against every negative, as long as a
  block holds an active anchor: ceil(count / block) blocks instead of
  N / block, with no fixed capacity to overflow. Each active row gets the
  arithmetic of `_lse_rows` on its own; only XLA's matmul blocking, which
  may depend on the number of rows, can change its last bits. Inactive rows
  get lse = pos (l_k = 0), positive weight 1 and no negative term: exactly
  the derivative of lse = pos, and weightless anyway. The loop runs inside
  the custom VJP's forward pass, so it is never differentiated.
  """
  n, d = anchor.shape
  block = cfg.anchor_block
  order = jnp.argsort(jnp.logical_not(active), stable=True).astype(jnp.int32)
  count = jnp.sum(active, dtype=jnp.int32)
  anchor_c, pos_c, label_c = anchor[order], pos[order], anchor_label[order]
  init = (
    jnp.int32(0),
    pos_c,
    jnp.ones((n,), jnp.float32),
    jnp.zeros((n, d), jnp.float32) if with_grad else None,
  )

  def body(carry):
    b, *outs = carry
    # The last block ends at row N (it may redo rows of the one before it).
    start = jnp.minimum(b * block, n - block)
    rows = [lax.dynamic_slice_in_dim(x, start, block, 0) for x in (anchor_c, pos_c, label_c)]
    new = _lse_rows(*rows, negatives, cfg, with_grad)
    outs = [
      None if o is None else lax.dynamic_update_slice_in_dim(o, x, start, 0)
      for o, x in zip(outs, new)
    ]
    return (b + 1, *outs)

  _, lse, pos_weight, neg_mean = lax.while_loop(lambda carry: carry[0] * block < count, body, init)
  # Back to the input order; rows past `count` of a last partial block are
  # inactive anchors: reset them.
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  lse = jnp.where(active, lse[rank], pos)
  pos_weight = jnp.where(active, pos_weight[rank], 1.0)
  if neg_mean is not None:
    neg_mean = jnp.where(active[:, None], neg_mean[rank], 0.0)
  return lse, pos_weight, neg_mean


def _lse_all(anchor, pos, anchor_label, neg_feats, neg_labels, neg_valid, active, cfg, with_grad):
  negatives = (neg_feats, neg_labels, neg_valid)
  if cfg.anchor_block:
    return _active_rows(anchor, pos, anchor_label, active, negatives, cfg, with_grad)
  return _lse_rows(anchor, pos, anchor_label, negatives, cfg, with_grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _negative_lse(anchor, pos, anchor_label, neg_feats, neg_labels, neg_valid, active, cfg):
  """lse_k = log(exp(pos_k) + Σ_j m_kj exp(<a_k, n_j>/τ)), float32 [N].

  With `cfg.anchor_block`, only for the `active` anchors (bool [N]); the
  others get lse_k = pos_k. Differentiable in `anchor` [N, D] and `pos` [N]
  only; the negatives, labels and masks get zero cotangents.
  """
  lse, _, _ = _lse_all(
    anchor, pos, anchor_label, neg_feats, neg_labels, neg_valid, active, cfg, with_grad=False
  )
  return lse


def _negative_lse_fwd(anchor, pos, anchor_label, neg_feats, neg_labels, neg_valid, active, cfg):
  # d lse/d pos_k = softmax weight of the positive; d lse/d a_k =
  # (1/τ) Σ_j q_kj n_j with q_kj = m_kj exp(s_kj − lse_k).
  lse, pos_weight, neg_mean = _lse_all(
    anchor, pos, anchor_label, neg_feats, neg_labels, neg_valid, active, cfg, with_grad=True
  )
  return lse, (pos_weight, neg_mean)


def _negative_lse_bwd(cfg, residuals, ct):
  pos_weight, neg_mean = residuals
  d_anchor = ct[:, None] * neg_mean * cfg.inv_temperature
  return d_anchor, ct * pos_weight, None, None, None, None, None


_negative_lse.defvjp(_negative_lse_fwd, _negative_lse_bwd)


def resolve_matmul_dtype(matmul_dtype, backend=None) -> str:
  """The DC loss's matmul operand dtype name; 'auto' depends on the backend.

  'auto' is bfloat16 (float32 accumulation) on accelerators, whose tensor
  cores run it at ~15x the rate of float32 at HIGHEST precision, and float32
  on CPU, where XLA has no fast bfloat16 matmul. Any other value is a dtype
  (name or jnp dtype), returned by name.
  """
  if isinstance(matmul_dtype, str) and matmul_dtype == 'auto':
    backend = backend or jax.default_backend()
    return 'float32' if backend == 'cpu' else 'bfloat16'
  name = jnp.dtype(matmul_dtype).name
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"matmul_dtype must be 'auto', float32 or bfloat16; got {matmul_dtype!r}.")
  return name


def _shift_mode(shift, inv_temperature) -> str:
  """'positive' or 'static' where its terms stay in float32 range, else 'online'."""
  if shift not in SHIFTS:
    raise ValueError(f'shift must be one of {SHIFTS}; got {shift!r}.')
  limit = _MAX_STATIC_SHIFT_SPREAD if shift == 'static' else _MAX_FIXED_SHIFT_SPREAD
  return 'online' if 2.0 * inv_temperature > limit else shift


def anchor_block_rows(anchor_block, num_anchors) -> int:
  """Rows per block of active anchors: `anchor_block` (a fraction of the
  anchors) x N, rounded up to a multiple of 8, at most N; 0 = the dense path
  (every anchor scored)."""
  if not 0 <= anchor_block <= 1:
    raise ValueError(f'anchor_block must be in [0, 1]; got {anchor_block}.')
  if not anchor_block or not num_anchors:
    return 0
  rows = -(-math.ceil(anchor_block * num_anchors) // 8) * 8
  return max(1, min(num_anchors, rows))


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
  cfg = _LseConfig(
    inv_temperature=inv_t,
    chunk_size=int(chunk_size),
    filter_negatives=bool(filter_negatives),
    shift=_shift_mode(shift, inv_t),
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
  lse = _negative_lse(
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
      fraction of N (`_active_rows`); 0 scores every anchor (the dense path).
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
