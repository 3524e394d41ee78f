"""Cross-entropy and the flat directional contrastive loss vs float64 NumPy.

The references below are written independently of `cac_jax.losses`: dense
[N, K] matrices and the textbook formulas, in float64, on the same float32
inputs, so only the float32 arithmetic of the JAX code is measured (EPS =
2^-24 = 6e-8 per rounding). Each tolerance is derived at its assertion; in
short: a logit s = <a, n>/τ of unit D-vectors is off by ~sqrt(D) EPS/τ
(a D-term dot product, terms <= 1, then scaled by 1/τ), a loss l = lse - pos
by about twice that, absolute; a gradient (p t + Σ_j q_j n_j - t)/τ is off
by ~(logit error) x (its terms, <= 2/τ per component), i.e. relative to the
largest gradient entry, not to each entry. Real errors are far larger: a
wrong mask or weight changes the loss by > 1e-2 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cac_jax import losses, negative_lse

# ----------------------------------------------------------------------------
# Cross-entropy.


def test_cross_entropy_matches_torch_with_ignore():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 6, 7)).astype(np.float32) * 3
  labels = rng.integers(0, 7, size=(2, 5, 6))
  labels[rng.random(labels.shape) < 0.3] = 255
  ref = torch.nn.CrossEntropyLoss(ignore_index=255)(
    torch.from_numpy(logits.astype(np.float64)).permute(0, 3, 1, 2), torch.from_numpy(labels)
  ).item()
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  # Per pixel l = log Σ exp(x_j - m) - (x_y - m): the sum is >= 1 (its max
  # term is exactly 1), so its log is good to a few EPS absolute, and x_y - m
  # to EPS |x_y - m| <= EPS l; then a mean of ~42 positive terms (log2(42)
  # ~ 6 roundings). ~10 EPS = 6e-7 relative; rtol 1e-5 is 16x over that
  # (measured 6e-8). Counting the ignored pixels changes the loss by ~30%.
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  # bf16 logits are upcast, not computed in bf16.
  got16 = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
  ref16 = torch.nn.CrossEntropyLoss(ignore_index=255)(
    torch.from_numpy(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64)).permute(0, 3, 1, 2),
    torch.from_numpy(labels),
  ).item()
  # The same float32 arithmetic on the bf16-rounded logits (which the
  # reference also uses): the same rtol. Computing in bf16 would be off by
  # ~2^-9 = 2e-3.
  np.testing.assert_allclose(float(got16), ref16, rtol=1e-5)


def test_cross_entropy_all_ignored_is_zero_with_finite_grad():
  logits = jnp.ones((1, 3, 3, 4))
  labels = jnp.full((1, 3, 3), 255)
  value, grad = jax.value_and_grad(losses.cross_entropy)(logits, labels)
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_cross_entropy_rejects_bad_shapes():
  with pytest.raises(ValueError, match='leading shape'):
    losses.cross_entropy(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 5), int))


# ----------------------------------------------------------------------------
# Directional contrastive loss: float64 reference with an analytic gradient.


def reference_dc(
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
):
  """Returns (loss, d loss / d anchor), float64, dense."""
  a = anchor.astype(np.float64)
  t = target.astype(np.float64)
  n = neg_feats.astype(np.float64)
  pos = np.einsum('kd,kd->k', a, t) / temperature  # [N]
  s = a @ n.T / temperature  # [N, K]
  m = np.broadcast_to(neg_valid[None, :], s.shape).astype(np.float64)
  if filter_negatives:
    m = m * (neg_labels[None, :] != anchor_label[:, None])
  big = np.maximum(pos, np.max(np.where(m > 0, s, -np.inf), axis=1))
  denom = np.exp(pos - big) + np.sum(m * np.exp(s - big[:, None]), axis=1)
  lse = big + np.log(denom)
  l = lse - pos
  w = valid.astype(np.float64)
  if pos_threshold > 0:
    w = w * (target_conf > pos_threshold)
  if directional:
    w = w * (anchor_conf < target_conf)
  total = w.sum() + 1e-12
  loss = np.sum(w * l) / total
  # dl_k/da_k = (p_k t_k + Σ_j q_kj n_j − t_k) / τ.
  p = np.exp(pos - lse)
  q = m * np.exp(s - lse[:, None])
  grad = (p[:, None] * t + q @ n - t) / temperature
  return loss, grad * (w / total)[:, None]


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_problem(seed, n=64, k=300, d=16, num_classes=5, valid_frac=0.8):
  rng = np.random.default_rng(seed)
  return dict(
    anchor=unit(rng.normal(size=(n, d))).astype(np.float32),
    target=unit(rng.normal(size=(n, d))).astype(np.float32),
    anchor_conf=rng.uniform(0.2, 1.0, n).astype(np.float32),
    target_conf=rng.uniform(0.2, 1.0, n).astype(np.float32),
    anchor_label=rng.integers(0, num_classes, n),
    valid=rng.random(n) < valid_frac,
    neg_feats=unit(rng.normal(size=(k, d))).astype(np.float32),
    neg_labels=rng.integers(0, num_classes, k),
    neg_valid=rng.random(k) < 0.9,
  )


def jax_value_and_grads(problem, **kw):
  names = ('anchor', 'target', 'neg_feats')

  def f(anchor, target, neg_feats):
    args = dict(problem, anchor=anchor, target=target, neg_feats=neg_feats)
    return losses.directional_contrastive_loss(
      **{key: jnp.asarray(v) for key, v in args.items()}, **kw
    )

  value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(
    *[jnp.asarray(problem[name]) for name in names]
  )
  return float(value), [np.asarray(g) for g in grads]


SWITCHES = [
  dict(pos_threshold=0.75, directional=True, filter_negatives=True),
  dict(pos_threshold=0.75, directional=False, filter_negatives=True),
  dict(pos_threshold=0.75, directional=True, filter_negatives=False),
  dict(pos_threshold=0.0, directional=True, filter_negatives=True),
  dict(pos_threshold=0.0, directional=False, filter_negatives=False),
]


@pytest.mark.parametrize('anchor_block', [0.0, negative_lse.DEFAULT_ANCHOR_BLOCK])
@pytest.mark.parametrize('switches', SWITCHES)
def test_dc_loss_matches_reference(switches, anchor_block):
  # K = 300 with chunk 128: two full chunks and a remainder of 44. Both the
  # dense path (every anchor scored) and the default, active anchors only
  # (tests/test_dc_fast.py has the rest of the fast paths).
  problem = random_problem(seed=hash(tuple(switches.values())) % 1000)
  ref_loss, ref_grad = reference_dc(**problem, temperature=0.1, **switches)
  loss, (g_anchor, g_target, g_neg) = jax_value_and_grads(
    problem, temperature=0.1, chunk_size=128, anchor_block=anchor_block, **switches
  )
  assert ref_loss > 1.0  # a real, non-trivial loss
  # τ = 0.1, D = 16: a logit is off by ~sqrt(16) EPS / 0.1 = 2.4e-6, so
  # l_k = lse - pos by ~5e-6 of l ~ 9, and the weighted mean averages these:
  # < 1e-6 relative expected; rtol 1e-5 (measured 9e-8).
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  # Gradient: q_j and p move by the logit error (relative), so an entry is
  # off by ~2.4e-6 x its terms |t| + Σ q |n| (<= 2/τ x w/Σw, the scale of the
  # largest entry), whatever the entry's own size (they may cancel): an
  # absolute tolerance, ~5e-6 of max|grad| at worst; 1e-5 of it (measured
  # 2e-7). No rtol on top: it only let the largest entries be 10x further
  # off.
  np.testing.assert_allclose(g_anchor, ref_grad, atol=1e-5 * np.abs(ref_grad).max(), rtol=0)
  assert np.abs(ref_grad).max() > 0
  assert np.all(g_target == 0.0) and np.all(g_neg == 0.0)


@pytest.mark.parametrize('temperature', [0.02, 0.5])
@pytest.mark.parametrize('chunk_size', [1, 7, 300, 1000])
def test_dc_loss_chunking_and_shift_modes(temperature, chunk_size):
  # τ = 0.02 uses the running-max path, τ = 0.5 the fixed shift; chunk sizes
  # cover one-negative chunks, a ragged remainder, K == chunk and K < chunk.
  problem = random_problem(seed=chunk_size, n=16, k=300, d=8)
  kw = dict(pos_threshold=0.5, directional=True, filter_negatives=True)
  ref_loss, ref_grad = reference_dc(**problem, temperature=temperature, **kw)
  loss, (g_anchor, _, _) = jax_value_and_grads(
    problem, temperature=temperature, chunk_size=chunk_size, **kw
  )
  # At τ = 0.02 logits reach 50: a D = 8 logit is off by ~sqrt(8) EPS · 50 =
  # 8.5e-6 absolute, l_k by ~2e-5 on a loss of ~50: 4e-7 relative, and the
  # accumulator (up to 300 sequential adds and online-max rescales at
  # chunk 1) by <= 300 EPS = 1.8e-5 relative, i.e. that much absolute in
  # lse. rtol 1e-5 x 50 = 5e-4 absolute: >= 10x over these (measured 4e-8
  # relative). A ragged last chunk that counted its overlap twice adds one
  # negative of ~300: ~3e-3 on l_k.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  # Gradient: entries off by (logit + accumulator error, <= 3e-5 relative on
  # each q) x their terms (<= 2 x max|grad|): <= 6e-5 of max|grad| at worst,
  # hence atol 1e-4 of it and no rtol (measured 5e-7 of it); the
  # double-counted negative above moves it by ~q_j/τ ~ 3e-3 of max|grad|.
  np.testing.assert_allclose(g_anchor, ref_grad, atol=1e-4 * np.abs(ref_grad).max(), rtol=0)


def test_dc_loss_tiny_temperature_is_stable():
  # τ = 1e-3: logits up to ±1000, exp overflows without a proper shift. A
  # D = 16 logit is then off by ~sqrt(16) EPS · 1000 = 2.4e-4 absolute (16 EPS
  # · 1000 = 1e-3 at worst), so the loss (a difference of such logits, here
  # ~650) by ~2x that, absolute, whatever its size: atol 1e-2 (5x over the
  # worst case) plus rtol 1e-5 (7e-3 here); measured 9e-5. A missing or
  # wrong shift gives inf/NaN or an O(1) error.
  problem = random_problem(seed=3)
  kw = dict(temperature=1e-3, pos_threshold=0.0, directional=False, filter_negatives=True)
  ref_loss, ref_grad = reference_dc(**problem, **kw)
  loss, (g_anchor, _, _) = jax_value_and_grads(problem, chunk_size=128, **kw)
  assert np.isfinite(loss) and np.all(np.isfinite(g_anchor))
  assert ref_loss > 10
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-2)
  # Gradient: each q moves by the logit error (2.4e-4 relative, 1e-3 at
  # worst), times terms <= 2 x max|grad|: atol 1e-3 of max|grad| (measured
  # 4e-6 of it: the near one-hot softmax damps δq = q(1 - q) δs).
  np.testing.assert_allclose(g_anchor, ref_grad, atol=1e-3 * np.abs(ref_grad).max())


def test_dc_loss_no_active_anchor_is_zero_with_finite_grads():
  problem = random_problem(seed=4)
  problem['target_conf'] = np.zeros_like(problem['target_conf'])  # < γ
  loss, (g_anchor, _, _) = jax_value_and_grads(problem, temperature=0.1, chunk_size=128)
  assert loss == 0.0
  assert np.all(g_anchor == 0.0)


def test_dc_loss_all_negatives_filtered():
  # Every negative shares the anchor's label: l_k = −log(1) = 0 for all k.
  problem = random_problem(seed=5)
  problem['anchor_label'] = np.full_like(problem['anchor_label'], 2)
  problem['neg_labels'] = np.full_like(problem['neg_labels'], 2)
  kw = dict(temperature=0.1, pos_threshold=0.0, directional=False, filter_negatives=True)
  loss, (g_anchor, _, _) = jax_value_and_grads(problem, chunk_size=128, **kw)
  ref_loss, _ = reference_dc(**problem, **kw)
  assert ref_loss == 0.0
  # Exactly 0 in float32 too (the sum is the positive term alone, exactly 1;
  # log 1 = 0; the gradient's p - 1 = 0): 1e-6 only admits an exp or log a
  # few ulps off, which leaves ~EPS/τ = 6e-7 / N. One unfiltered negative
  # would give l_k = log(1 + e^(s - pos)) ~ 0.3 or more.
  assert abs(loss) < 1e-6 and np.all(np.abs(g_anchor) < 1e-6)
  # Without filtering the same negatives count again; rtol as derived in
  # test_dc_loss_matches_reference (τ = 0.1, D = 16).
  kw['filter_negatives'] = False
  loss, _ = jax_value_and_grads(problem, chunk_size=128, **kw)
  np.testing.assert_allclose(loss, reference_dc(**problem, **kw)[0], rtol=1e-5)


def test_dc_loss_without_negatives():
  problem = random_problem(seed=6, k=0)
  loss, (g_anchor, _, _) = jax_value_and_grads(problem, temperature=0.1)
  assert loss == 0.0 and np.all(g_anchor == 0.0)


def test_dc_loss_rejects_bad_inputs():
  problem = {k: jnp.asarray(v) for k, v in random_problem(seed=7).items()}
  with pytest.raises(ValueError, match='neg_feats must be'):
    losses.directional_contrastive_loss(**dict(problem, neg_feats=problem['neg_feats'][:, :3]))
  with pytest.raises(ValueError, match='anchor_conf must be'):
    losses.directional_contrastive_loss(**dict(problem, anchor_conf=problem['anchor_conf'][:3]))
  with pytest.raises(ValueError, match='temperature'):
    losses.directional_contrastive_loss(**problem, temperature=0.0)


def _temp_bytes(num_negatives, chunk, n=256, d=32):
  problem = random_problem(seed=0, n=n, k=num_negatives, d=d)
  args = {k: jax.ShapeDtypeStruct(np.shape(v), jnp.asarray(v).dtype) for k, v in problem.items()}

  def loss_fn(anchor, rest):
    return losses.directional_contrastive_loss(anchor=anchor, **rest, chunk_size=chunk)

  rest = {k: v for k, v in args.items() if k != 'anchor'}
  compiled = jax.jit(jax.grad(loss_fn)).lower(args['anchor'], rest).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_dc_loss_memory_does_not_grow_with_negatives():
  # Compile-time figure, deterministic. One [N, chunk] float32 block is
  # 256 · 512 · 4 = 512 KiB; the full [N, K] matrix at K = 8 chunks would be
  # 4 MiB, so flat memory means "well under 2x" from 2 to 8 chunks.
  chunk = 512
  small = _temp_bytes(2 * chunk, chunk)
  large = _temp_bytes(8 * chunk, chunk)
  assert large < 1.25 * small + 64 * 1024, (small, large)
  assert large < 256 * 8 * chunk * 4  # far below a dense [N, K] matrix


def test_contrastive_weights_ties_and_threshold_are_strict():
  # CAC keeps an anchor only if its target is STRICTLY more confident and
  # STRICTLY above γ; ties are dropped.
  anchor_conf = jnp.array([0.8, 0.7, 0.5, 0.9, 0.6])
  target_conf = jnp.array([0.8, 0.75, 0.9, 0.95, 0.9])
  valid = jnp.array([True, True, True, True, False])
  w = losses.contrastive_weights(
    anchor_conf, target_conf, valid, pos_threshold=0.75, directional=True
  )
  np.testing.assert_array_equal(np.asarray(w), [0, 0, 1, 1, 0])
  w = losses.contrastive_weights(
    anchor_conf, target_conf, valid, pos_threshold=0.0, directional=False
  )
  np.testing.assert_array_equal(np.asarray(w), [1, 1, 1, 1, 0])
