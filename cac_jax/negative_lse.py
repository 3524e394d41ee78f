"""The negative term of the DC loss: a chunked log-sum-exp over negatives
with a custom VJP, for every anchor or for the active ones only.

For anchors a_k (unit norm) with positive logit pos_k, it computes
lse_k = log(exp(pos_k) + Σ_j m_kj exp(<a_k, n_j>/τ)), where m_kj keeps the
valid negatives n_j (with `filter_negatives`, those whose pseudo-label
differs from the anchor's); `losses.dc_direction` turns it into the loss.

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

Nothing here imports TensorFlow.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Largest logit spread 2/τ for which the fixed per-anchor shift is used:
# e^60 · (1e12 negatives) is still < float32 max (3.4e38).
_MAX_FIXED_SHIFT_SPREAD = 60.0
# Largest spread for the static shift 1/τ: its terms are >= e^{-2/τ}, and
# e^-80 = 1.8e-35 is above the smallest normal float32 and bfloat16 (1.2e-38).
_MAX_STATIC_SHIFT_SPREAD = 80.0
# Shifts of the log-sum-exp (`losses.dc_direction`); both are exact-stable where
# they are used, and an online max takes over beyond their spread.
SHIFTS = ('positive', 'static')
# Default block of active anchors, as a fraction of a direction's anchors
# (cac.anchor_block): VOC steps have 15-25% of the cells active, so one to
# two blocks run.
DEFAULT_ANCHOR_BLOCK = 0.125


class LseConfig(NamedTuple):
  """Static settings of the chunked log-sum-exp (hashable for custom_vjp)."""

  inv_temperature: float
  chunk_size: int
  filter_negatives: bool
  shift: str  # 'positive' | 'static' | 'online' (resolved by `shift_mode`)
  matmul_dtype: str  # 'float32' | 'bfloat16' (resolved by `resolve_matmul_dtype`)
  anchor_block: int  # rows per block of active anchors; 0 = score every anchor


def _lse_loop(
  anchor, pos, anchor_label, neg_feats, neg_labels, neg_valid, cfg: LseConfig, with_grad: bool
):
  """Loops over chunks of negatives; see `negative_lse` for the math.

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
    # never stores this [N, C] mask (see `losses._negative_sums` for why the class
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
def negative_lse(anchor, pos, anchor_label, neg_feats, neg_labels, neg_valid, active, cfg):
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


negative_lse.defvjp(_negative_lse_fwd, _negative_lse_bwd)


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


def shift_mode(shift, inv_temperature) -> str:
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
