"""The DC loss's fast paths against the dense path and float64 NumPy.

Variants (cac_jax/negative_lse.py): active-anchor compaction (`anchor_block`, only
the anchors with w > 0 are scored, in blocks, while a block holds one),
bfloat16 matmul operands (`matmul_dtype`, the accelerator default of
'auto'), and the static shift 1/τ (`shift='static'`). Each is checked on
fresh random inputs for its value and its gradient against the dense float32
path (`anchor_block=0`, HIGHEST precision, the positive logit as shift: the
code before these variants) and against the float64 dense reference of
tests/test_losses.py. EPS = 2^-24.

Tolerances. Compaction runs each active row through the same arithmetic as
the dense path; only the matmul's blocking, which XLA may choose by the row
count, can reorder a D-term dot product (<= D EPS relative per logit), so it
is held to the dense path at 1e-6 (bit-equal on the dev CPU) and to the
reference at the tolerances derived in tests/test_losses.py.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from cac_jax import losses, negative_lse
from test_losses import jax_value_and_grads, random_problem, reference_dc, unit

SWITCHES = dict(pos_threshold=0.5, directional=True, filter_negatives=True)


def _close_to_dense(got, dense):
  (loss, grads), (loss0, grads0) = got, dense
  np.testing.assert_allclose(loss, loss0, rtol=1e-6)
  scale = np.abs(grads0[0]).max()
  np.testing.assert_allclose(grads[0], grads0[0], rtol=0, atol=1e-6 * max(scale, 1e-30))


def _close_to_reference(got, problem, **kw):
  loss, (g_anchor, g_target, g_neg) = got
  ref_loss, ref_grad = reference_dc(**problem, **kw)
  # As tests/test_losses.py::test_dc_loss_matches_reference (τ = 0.1, D = 16):
  # rtol 1e-5 on the loss (~1e-6 expected), gradient entries to 1e-5 of the
  # largest; atol 1e-6 for a loss of exactly 0.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    g_anchor, ref_grad, atol=1e-5 * max(np.abs(ref_grad).max(), 1e-6), rtol=0
  )
  assert np.all(g_target == 0.0) and np.all(g_neg == 0.0)
  return ref_loss, ref_grad


def _regime(problem, regime):
  """Few, all, one or no active anchors (w > 0) of a random problem."""
  p, kw = dict(problem), dict(SWITCHES)
  if regime == 'all':  # every anchor active: N / block blocks, last one clamped
    p['valid'] = np.ones_like(p['valid'])
    kw.update(pos_threshold=0.0, directional=False)
  elif regime == 'one':
    p['valid'] = np.arange(len(p['valid'])) == 37
    kw.update(pos_threshold=0.0, directional=False)
  elif regime == 'none':
    p['target_conf'] = np.zeros_like(p['target_conf'])  # all < γ
  return p, kw


@pytest.mark.parametrize('block', [0.1, 0.3, 1.0])
@pytest.mark.parametrize('regime', ['some', 'all', 'one', 'none'])
def test_compact_equals_dense_and_reference(block, regime):
  # N = 64: blocks of 8 (8 blocks when all are active), 24 (N not a multiple:
  # the last block is clamped to end at row N and redoes rows of the one
  # before it) and 64 (one block). 'all' is the case of more active anchors
  # than one block holds; 'none' runs no block at all. K = 300, chunk 128.
  seed = np.random.SeedSequence().entropy % 2**32
  problem, kw = _regime(random_problem(seed=seed), regime)
  active = losses.contrastive_weights(
    problem['anchor_conf'],
    problem['target_conf'],
    problem['valid'],
    pos_threshold=kw['pos_threshold'],
    directional=kw['directional'],
  )
  count = int(np.sum(np.asarray(active)))
  assert {'some': 0 < count < 64, 'all': count == 64, 'one': count == 1, 'none': count == 0}[
    regime
  ], (regime, count)
  common = dict(temperature=0.1, chunk_size=128, **kw)
  dense = jax_value_and_grads(problem, anchor_block=0.0, **common)
  got = jax_value_and_grads(problem, anchor_block=block, **common)
  _close_to_dense((got[0], got[1]), (dense[0], dense[1]))
  _close_to_reference(got, problem, temperature=0.1, **kw)
  if regime == 'none':
    assert got[0] == 0.0 and np.all(got[1][0] == 0.0)
  else:
    assert np.abs(got[1][0]).max() > 0


def test_inactive_anchors_are_not_scored():
  # The log-sum-exp itself: active rows as the dense path's, inactive rows
  # exactly the positive logit (l_k = 0), even those that share the last,
  # partial block with active ones. Their weight is 0, so the loss is the
  # same; a scored inactive row would differ from pos by log(1 + ...) > 0.
  rng = np.random.default_rng(np.random.SeedSequence().entropy)
  n, k, d = 40, 200, 16
  anchor = jnp.asarray(unit(rng.normal(size=(n, d))), jnp.float32)
  pos = jnp.asarray(rng.uniform(-5, 5, n), jnp.float32)
  label = jnp.asarray(rng.integers(0, 4, n), jnp.int32)
  negs = (
    jnp.asarray(unit(rng.normal(size=(k, d))), jnp.float32),
    jnp.asarray(rng.integers(0, 4, k), jnp.int32),
    jnp.ones((k,), bool),
  )
  active = jnp.asarray(rng.random(n) < 0.3)
  cfg = negative_lse.LseConfig(
    inv_temperature=10.0,
    chunk_size=64,
    filter_negatives=True,
    shift='positive',
    matmul_dtype='float32',
    anchor_block=16,
  )
  lse = negative_lse.negative_lse(anchor, pos, label, *negs, active, cfg)
  dense = negative_lse.negative_lse(anchor, pos, label, *negs, active, cfg._replace(anchor_block=0))
  a = np.asarray(active)
  assert 0 < a.sum() < n
  np.testing.assert_array_equal(np.asarray(lse)[~a], np.asarray(pos)[~a])
  np.testing.assert_allclose(np.asarray(lse)[a], np.asarray(dense)[a], rtol=1e-6)
  assert np.all(np.asarray(dense)[~a] > np.asarray(pos)[~a])


def test_bfloat16_matmuls_error_against_float64():
  # VOC-like D = 128, 21 classes, K = 2,048; the value and gradient error of
  # bfloat16 operands (float32 accumulation) against the exact float64 loss.
  # Each operand rounds to 2^-9 relative, so a logit <a, n>/τ moves by at
  # most 2^-8 Σ_d |a_d n_d| / τ <= 2^-8 / τ = 0.04 (worst case, all roundings
  # aligned), typically ~2^-8 sqrt(Σ a_d² n_d²) / τ ~ 0.003 for random unit
  # vectors, and these errors have random signs: over the ~70 active anchors
  # the loss moved by 3e-5 to 5e-5 absolute (of ~8) and the gradient by
  # 2.2e-4 to 2.8e-4 of its largest entry (seeds 100-102), against 3e-7 to
  # 8e-7 and ~1e-7 with float32 operands. Asserted: loss within 1e-3
  # absolute and gradient within 3e-3 of max|grad| (>= 10x the measured
  # error), and a gradient error above 3e-5 of max|grad|, i.e. bfloat16 is
  # really what ran (float32's is 300x smaller).
  seed = np.random.SeedSequence().entropy % 2**32
  problem = random_problem(seed=seed, n=256, k=2048, d=128, num_classes=21)
  kw = dict(temperature=0.1, **SWITCHES)
  ref_loss, ref_grad = reference_dc(**problem, **kw)
  for block in (0.0, negative_lse.DEFAULT_ANCHOR_BLOCK):
    loss, (g, _, _) = jax_value_and_grads(
      problem, chunk_size=512, anchor_block=block, matmul_dtype='bfloat16', **kw
    )
    assert abs(loss - ref_loss) < 1e-3, (loss, ref_loss)
    err = np.abs(g - ref_grad).max() / np.abs(ref_grad).max()
    assert 3e-5 < err < 3e-3, err


def test_matmul_dtype_auto_resolves_by_backend():
  assert negative_lse.resolve_matmul_dtype('auto', 'cpu') == 'float32'
  assert negative_lse.resolve_matmul_dtype('auto', 'gpu') == 'bfloat16'
  assert negative_lse.resolve_matmul_dtype('auto', 'tpu') == 'bfloat16'
  assert negative_lse.resolve_matmul_dtype('auto') == 'float32'  # the tests' CPU
  assert negative_lse.resolve_matmul_dtype(jnp.bfloat16, 'cpu') == 'bfloat16'
  assert negative_lse.resolve_matmul_dtype('float32', 'gpu') == 'float32'
  with pytest.raises(ValueError, match='matmul_dtype'):
    negative_lse.resolve_matmul_dtype('float16')


def test_config_defaults_are_the_loss_defaults():
  from cac_jax import config_lib

  cac = config_lib.base_config().cac
  assert cac.anchor_block == negative_lse.DEFAULT_ANCHOR_BLOCK
  assert cac.matmul_dtype == 'auto'


def test_anchor_block_rows():
  assert negative_lse.anchor_block_rows(0.125, 12_800) == 1_600
  assert negative_lse.anchor_block_rows(0.1, 64) == 8  # 6.4 -> 7 -> 8
  assert negative_lse.anchor_block_rows(0.3, 64) == 24  # 19.2 -> 20 -> 24
  assert negative_lse.anchor_block_rows(0.5, 3) == 3  # at most N
  assert negative_lse.anchor_block_rows(0.0, 64) == 0  # the dense path
  assert negative_lse.anchor_block_rows(0.5, 0) == 0
  with pytest.raises(ValueError, match='anchor_block'):
    negative_lse.anchor_block_rows(1.5, 64)


def _aligned_problem(rng, n, k, d, *, target_sign, noise=0.01):
  """Anchors near one direction u, negatives near -u (label 1, anchors 0),
  targets near target_sign * u: every logit <a, n>/τ is near -1/τ."""
  u = unit(rng.normal(size=d))
  near = lambda sign, m: unit(sign * u + noise * rng.normal(size=(m, d))).astype(np.float32)
  return dict(
    anchor=near(1, n),
    target=near(target_sign, n),
    anchor_conf=np.zeros(n, np.float32),
    target_conf=np.ones(n, np.float32),
    anchor_label=np.zeros(n, int),
    valid=np.ones(n, bool),
    neg_feats=near(-1, k),
    neg_labels=np.ones(k, int),
    neg_valid=np.ones(k, bool),
  )


@pytest.mark.parametrize('temperature', [0.1, 0.025])
@pytest.mark.parametrize('matmul_dtype', ['float32', 'bfloat16'])
def test_static_shift_at_the_edges_of_its_range(temperature, matmul_dtype):
  # With the static shift every term is exp(s - 1/τ) in [e^{-2/τ}, 1]. Here
  # every logit is near -1/τ (the positive anti-aligned with its anchor, the
  # negatives too), so EVERY term is ~e^{-2/τ}: e^-20 = 2e-9 at τ = 0.1 and
  # e^-80 = 1.8e-35 at τ = 0.025 (the static shift's limit), both above the
  # smallest normal float32 and bfloat16 (1.2e-38): nothing underflows and
  # l_k = log(1 + Σ_j e^{s_kj - pos_k}) ~ log(1 + K) comes out as in float64.
  # An underflow would give acc = 0, i.e. l = inf/NaN, or subnormal terms
  # with a few bits left (l off by >> the tolerances below).
  tiny = max(float(np.finfo(np.float32).tiny), float(ml_dtypes.finfo(ml_dtypes.bfloat16).tiny))
  assert np.exp(-2.0 / temperature) > tiny
  assert float(jnp.asarray(np.exp(-2.0 / temperature), jnp.bfloat16)) > tiny
  assert negative_lse.shift_mode('static', 1.0 / temperature) == 'static'
  rng = np.random.default_rng(np.random.SeedSequence().entropy)
  n, k, d = 32, 96, 16
  problem = _aligned_problem(rng, n, k, d, target_sign=-1)
  kw = dict(temperature=temperature, pos_threshold=0.0, directional=False, filter_negatives=True)
  got = jax_value_and_grads(problem, chunk_size=32, shift='static', matmul_dtype=matmul_dtype, **kw)
  ref_loss, ref_grad = reference_dc(**problem, **kw)
  assert np.isfinite(got[0]) and np.all(np.isfinite(got[1][0]))
  assert abs(ref_loss - np.log1p(k)) < 0.5
  # A gradient row is (p t + Σ q n - t)/τ / N with terms of size <= 2/τ / N
  # that nearly cancel here (t ~ n ~ -u), so its error is judged against
  # that term scale, not against the (small) result.
  term = 2.0 / temperature / n
  if matmul_dtype == 'float32':
    # Logits up to 40: off by ~sqrt(16) EPS x 40 = 1e-5 absolute; l = lse -
    # pos (~log 97 = 4.6) by ~2x that: rtol 1e-5 (4.6e-5 absolute, 2x over).
    # The softmax weights move by the same 2e-5 relative: gradient entries
    # by 2e-5 of the term scale; atol 1e-4 of it.
    np.testing.assert_allclose(got[0], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(got[1][0], ref_grad, rtol=0, atol=1e-4 * term)
    positive = jax_value_and_grads(problem, chunk_size=32, shift='positive', **kw)
    np.testing.assert_allclose(got[0], positive[0], rtol=1e-5)
  else:
    # bfloat16 operands: a logit moves by <= 2^-8 Σ|a_d n_d| / τ <= 2^-8/τ
    # (0.04 / 0.16), lse by no more (pos is float32): atol 2^-8/τ on the
    # loss; the softmax weights by as much relative (<= 17%): atol 0.2 of
    # the term scale on the gradient.
    np.testing.assert_allclose(got[0], ref_loss, rtol=0, atol=2**-8 / temperature)
    np.testing.assert_allclose(got[1][0], ref_grad, rtol=0, atol=0.2 * term)


def test_static_shift_matches_the_positive_shift_and_reference():
  seed = np.random.SeedSequence().entropy % 2**32
  problem = random_problem(seed=seed)
  kw = dict(temperature=0.1, **SWITCHES)
  got = jax_value_and_grads(problem, chunk_size=128, shift='static', **kw)
  dense = jax_value_and_grads(problem, chunk_size=128, shift='positive', **kw)
  _close_to_reference(got, problem, **kw)
  # The two shifts round differently (exp(s - 1/τ) vs exp(s - pos)): each
  # term to a few EPS relative, l_k = lse - pos to ~EPS x |1/τ| absolute; so
  # they agree as each agrees with float64 (rtol 1e-5 there; 1e-5 here).
  np.testing.assert_allclose(got[0], dense[0], rtol=1e-5)
  # Below τ = 1/40 the static shift's terms could underflow: an online max
  # takes over (as below τ = 1/30 for the positive shift).
  assert negative_lse.shift_mode('static', 1 / 0.024) == 'online'
  assert negative_lse.shift_mode('positive', 1 / 0.032) == 'online'
  assert negative_lse.shift_mode('positive', 1 / 0.034) == 'positive'
  with pytest.raises(ValueError, match='shift'):
    negative_lse.shift_mode('max', 10.0)


def test_label_filter_is_exact_when_same_class_mass_dominates():
  # Why the filter stays a mask inside the exponential's fusion rather than
  # Σ_j e_kj − Σ_{j: y_j = y_k} e_kj (a matmul of the exponentials with the
  # one-hot labels): when nearly all of an anchor's mass is in its own class,
  # that difference cancels. Here 300 same-class negatives sit at the
  # anchors (s ~ 1/τ = 10) and 100 others are orthogonal to them (s ~ 0),
  # and the positives are orthogonal too: the kept mass is ~100 / (300 e^10)
  # = 1.5e-5 of the total, below float32's resolution of a 400-term sum, so
  # the difference is mostly rounding noise, while the masked sum (and l_k ~
  # log(1 + 100)) is as exact as float32 gets.
  rng = np.random.default_rng(np.random.SeedSequence().entropy)
  n, k_same, k_other, d = 16, 300, 100, 16
  u = unit(rng.normal(size=d))
  ortho = lambda m: unit((lambda x: x - np.outer(x @ u, u))(rng.normal(size=(m, d))))
  near = lambda m: unit(u + 0.05 * rng.normal(size=(m, d)))
  anchor = near(n).astype(np.float32)
  neg = np.concatenate([near(k_same), ortho(k_other)]).astype(np.float32)
  neg_labels = np.repeat([0, 1], [k_same, k_other])
  problem = dict(
    anchor=anchor,
    target=ortho(n).astype(np.float32),
    anchor_conf=np.zeros(n, np.float32),
    target_conf=np.ones(n, np.float32),
    anchor_label=np.zeros(n, int),
    valid=np.ones(n, bool),
    neg_feats=neg,
    neg_labels=neg_labels,
    neg_valid=np.ones(len(neg), bool),
  )
  kw = dict(temperature=0.1, pos_threshold=0.0, directional=False, filter_negatives=True)
  got = jax_value_and_grads(problem, chunk_size=128, **kw)
  ref_loss, _ = _close_to_reference(got, problem, **kw)
  assert abs(ref_loss - np.log1p(k_other)) < 0.5
  # The subtraction in float32 on the same logits, for contrast: sequential
  # float32 sums of the 400 terms, all, and those of the anchor's class.
  s = (anchor.astype(np.float64) @ neg.T.astype(np.float64) * 10 - 10).astype(np.float32)
  e = np.exp(s)
  same = neg_labels[None, :] == 0
  diff = (
    np.cumsum(e, axis=1, dtype=np.float32)[:, -1]
    - np.cumsum(np.where(same, e, 0), axis=1, dtype=np.float32)[:, -1]
  )
  exact = np.sum(np.where(same, 0, np.exp(s.astype(np.float64))), axis=1)
  assert np.median(np.abs(diff - exact) / exact) > 1e-3  # 100x the masked path's rtol


def _views_problem(rng, b=2, grid=8, d=16, num_classes=5, bank=64):
  proj = unit(rng.normal(size=(2, b, grid, grid, d))).astype(np.float32)
  logits = (2.0 * rng.normal(size=(2, b, grid, grid, num_classes))).astype(np.float32)
  # Image 0: view 2 is 16 px down and 8 px left of view 1; image 1: the same
  # crop (boxes of equal size, multiples of 8, in each unflipped frame).
  box1 = np.array([[16, 0, 64, 56], [0, 0, 64, 64]], np.int32)
  box2 = np.array([[0, 8, 48, 64], [0, 0, 64, 64]], np.int32)
  truth = rng.integers(0, num_classes, (2, b, grid, grid))
  return dict(
    proj1=proj[0],
    proj2=proj[1],
    logits1=logits[0],
    logits2=logits[1],
    box1=box1,
    box2=box2,
    flip1=np.array([True, False]),
    flip2=np.array([False, True]),
    bank_feats=unit(rng.normal(size=(bank, d))).astype(np.float32),
    bank_labels=rng.integers(0, num_classes, bank),
    bank_valid=rng.random(bank) < 0.8,
    truth1=truth[0],
    truth2=truth[1],
  )


def test_views_loss_gradients_and_diagnostics_equal_the_dense_path():
  # The full two-view function, with its ground-truth diagnostics, under the
  # VOC switches: compaction changes no output beyond float32 rounding.
  rng = np.random.default_rng(np.random.SeedSequence().entropy)
  problem = {k: jnp.asarray(v) for k, v in _views_problem(rng).items()}

  def run(anchor_block):
    def f(proj1, proj2):
      loss, aux = losses.dc_loss_from_views(
        proj1,
        proj2,
        **{k: v for k, v in problem.items() if k[:4] != 'proj'},
        key=None,
        temperature=0.1,
        pos_threshold=0.6,
        directional=True,
        filter_negatives=True,
        chunk_size=48,
        anchor_block=anchor_block,
      )
      return loss, {k: v for k, v in aux.items() if k[:4] != 'new_'}

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
      problem['proj1'], problem['proj2']
    )

  (loss, aux), grads = run(negative_lse.DEFAULT_ANCHOR_BLOCK)
  (loss0, aux0), grads0 = run(0.0)
  assert 0 < float(aux0['active_frac_12']) < 1 and float(loss0) > 0
  np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
  for g, g0 in zip(grads, grads0):
    g, g0 = np.asarray(g), np.asarray(g0)
    np.testing.assert_allclose(g, g0, rtol=0, atol=1e-6 * np.abs(g0).max())
  flat, flat0 = jax.tree.leaves_with_path(aux), dict(jax.tree.leaves_with_path(aux0))
  assert len(flat) == len(flat0) > 10
  for path, value in flat:
    # The diagnostics read l_k of active anchors only (loss_gap), so they
    # agree like the loss; the rest are the same arithmetic.
    np.testing.assert_allclose(
      float(value), float(flat0[path]), rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path)
    )


def test_a_run_saved_before_the_fast_paths_resumes_and_loads():
  # Its config.json says matmul_dtype 'float32' (the old default) and has no
  # anchor_block: resuming with today's defaults is allowed (a compute
  # option, like chunk_size), and inference fills the missing field.
  import json

  import ml_collections

  from cac_jax import run_dir, saved_run
  from train_utils import tiny_config

  saved = json.loads(json.dumps(tiny_config().to_dict()))
  saved['cac']['matmul_dtype'] = 'float32'
  del saved['cac']['anchor_block']
  assert run_dir.config_differences(saved, tiny_config()) == ([], ['cac.matmul_dtype'])
  config = saved_run._with_new_fields(ml_collections.ConfigDict(saved))
  assert config.cac.anchor_block == negative_lse.DEFAULT_ANCHOR_BLOCK
  assert config.cac.matmul_dtype == 'float32'
