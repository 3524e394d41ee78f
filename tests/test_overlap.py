"""Overlap geometry and `dc_loss_from_views` vs a per-image torch float64 loop.

The reference slices each image's overlap `[ul // 8 : br // 8]` directly (the
ragged way the authors' code does it), un-flips with `torch.flip`, builds
negatives from every cell of both views plus the bank, and lets torch
autograd produce the gradient w.r.t. both projection maps. Boxes come from a
re-implementation of the CAC pair sampler's geometry (docs/method.md §2).
Tolerances: float32 vs float64 with logits ≤ 1/τ = 10, derived as in
test_losses.py (EPS = 2^-24 per rounding) and stated at each assertion.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cac_jax import losses, overlap

STRIDE = 8


def cac_boxes(rng, crop):
  """One pair of overlap boxes the way CAC samples them (spec §2, steps 1-4)."""
  h_img, w_img = rng.integers(crop, 2 * crop, size=2)
  y1 = rng.integers(0, h_img - crop + 1)
  x1 = rng.integers(0, w_img - crop + 1)
  dy = dx = 0
  for _ in range(50):
    y2 = rng.integers(0, h_img - crop + 1)
    x2 = rng.integers(0, w_img - crop + 1)
    ddy = (y2 - y1) // STRIDE * STRIDE
    ddx = (x2 - x1) // STRIDE * STRIDE
    ddy += STRIDE if ddy < 0 else 0
    ddx += STRIDE if ddx < 0 else 0
    if abs(ddy) > crop or abs(ddx) > crop:
      continue
    inter = (crop - abs(ddy)) * (crop - abs(ddx))
    if 0.1 <= inter / (2 * crop * crop - inter) <= 1.0:
      dy, dx = ddy, ddx
      break
  hs, ws = h_img // STRIDE * STRIDE, w_img // STRIDE * STRIDE
  box1 = [max(0, dy), max(0, dx), min(crop, crop + dy, hs), min(crop, crop + dx, ws)]
  box2 = [max(0, -dy), max(0, -dx), min(crop, crop - dy, hs), min(crop, crop - dx, ws)]
  assert box1[2] - box1[0] == box2[2] - box2[0]
  assert box1[3] - box1[1] == box2[3] - box2[1]
  return box1, box2


def make_batch(seed, b=4, crop=56, d=8, num_classes=4, bank_size=20):
  rng = np.random.default_rng(seed)
  h = w = crop // STRIDE
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  boxes = [cac_boxes(rng, crop) for _ in range(b)]
  box1 = np.array([bx[0] for bx in boxes], np.int32)
  box2 = np.array([bx[1] for bx in boxes], np.int32)
  box1[-1] = box2[-1] = 0  # one image without any overlap
  return dict(
    proj1=unit(rng.normal(size=(b, h, w, d))),
    proj2=unit(rng.normal(size=(b, h, w, d))),
    logits1=(3 * rng.normal(size=(b, h, w, num_classes))).astype(np.float32),
    logits2=(3 * rng.normal(size=(b, h, w, num_classes))).astype(np.float32),
    box1=box1,
    box2=box2,
    flip1=rng.random(b) < 0.5,
    flip2=rng.random(b) < 0.5,
    bank_feats=unit(rng.normal(size=(bank_size, d))),
    bank_labels=rng.integers(0, num_classes, bank_size).astype(np.int32),
    bank_valid=rng.random(bank_size) < 0.7,
  )


def torch_reference(
  batch, *, temperature, pos_threshold, directional, filter_negatives, negatives=None
):
  """Returns (loss_12, loss_21, d(loss)/d proj1, d(loss)/d proj2)."""
  p1 = torch.tensor(batch['proj1'], dtype=torch.float64, requires_grad=True)
  p2 = torch.tensor(batch['proj2'], dtype=torch.float64, requires_grad=True)
  parts = {k: [] for k in ('f1', 'f2', 'c1', 'c2', 'y1', 'y2', 'nf', 'ny')}
  for i in range(p1.shape[0]):
    views = []
    for p, logits, flip in ((p1, 'logits1', 'flip1'), (p2, 'logits2', 'flip2')):
      f = p[i]
      lg = torch.tensor(batch[logits][i], dtype=torch.float64)
      if batch[flip][i]:
        f, lg = torch.flip(f, dims=[1]), torch.flip(lg, dims=[1])
      prob = torch.softmax(lg, dim=-1)
      views.append((f, prob.max(-1).values, prob.argmax(-1)))
    for (f, c, y), box, tag in (
      (views[0], batch['box1'][i], '1'),
      (views[1], batch['box2'][i], '2'),
    ):
      t, l, b, r = (int(v) // STRIDE for v in box)
      parts['f' + tag].append(f[t:b, l:r].reshape(-1, f.shape[-1]))
      parts['c' + tag].append(c[t:b, l:r].reshape(-1))
      parts['y' + tag].append(y[t:b, l:r].reshape(-1))
      parts['nf'].append(f.reshape(-1, f.shape[-1]).detach())
      parts['ny'].append(y.reshape(-1))
  cat = {k: torch.cat(v) for k, v in parts.items()}
  if negatives is None:
    neg_f, neg_y = cat['nf'], cat['ny']
  else:
    neg_f = torch.tensor(np.asarray(negatives[0]), dtype=torch.float64)
    neg_y = torch.tensor(np.asarray(negatives[1]))
  neg_f = torch.cat([neg_f, torch.tensor(batch['bank_feats'], dtype=torch.float64)])
  neg_y = torch.cat([neg_y, torch.tensor(batch['bank_labels']).long()])
  neg_ok = torch.cat(
    [
      torch.ones(len(neg_y) - len(batch['bank_valid']), dtype=bool),
      torch.tensor(batch['bank_valid']),
    ]
  )

  def one_direction(a, t, ca, ct, ya):
    t = t.detach()
    pos = (a * t).sum(-1) / temperature
    s = a @ neg_f.T / temperature
    m = neg_ok[None, :].expand_as(s)
    if filter_negatives:
      m = m & (neg_y[None, :] != ya[:, None])
    denom = torch.exp(pos) + (torch.exp(s) * m).sum(-1)
    l = -torch.log(torch.exp(pos) / denom)
    w = torch.ones_like(pos)
    if pos_threshold > 0:
      w = w * (ct > pos_threshold)
    if directional:
      w = w * (ca < ct)
    return (w * l).sum() / (w.sum() + 1e-12)

  l12 = one_direction(cat['f1'], cat['f2'], cat['c1'], cat['c2'], cat['y1'])
  l21 = one_direction(cat['f2'], cat['f1'], cat['c2'], cat['c1'], cat['y2'])
  (l12 + l21).backward()
  return l12.item(), l21.item(), p1.grad.numpy(), p2.grad.numpy()


def run_jax(batch, **kw):
  def f(proj1, proj2):
    args = {k: jnp.asarray(v) for k, v in batch.items()}
    args.update(proj1=proj1, proj2=proj2)
    return losses.dc_loss_from_views(**args, **kw)

  (loss, aux), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
    jnp.asarray(batch['proj1']), jnp.asarray(batch['proj2'])
  )
  return float(loss), aux, [np.asarray(g) for g in grads]


def test_overlap_index_map_matches_loop():
  rng = np.random.default_rng(0)
  h, w = 5, 7
  box1 = np.array([[8, 16, 32, 48], [0, 0, 40, 56], [8, 8, 8, 8]], np.int32)
  box2 = np.array([[0, 0, 24, 32], [0, 0, 40, 56], [0, 0, 0, 0]], np.int32)
  valid, index2 = overlap.batched_overlap_index_map(box1, box2, (h, w))
  for n in range(len(box1)):
    t1, l1, b1, r1 = box1[n] // 8
    t2, l2 = box2[n][:2] // 8
    for i in range(h):
      for j in range(w):
        inside = t1 <= i < b1 and l1 <= j < r1
        assert bool(valid[n, i * w + j]) == inside
        if inside:
          assert int(index2[n, i * w + j]) == (i - t1 + t2) * w + (j - l1 + l2)
  x = rng.normal(size=(3, h, w, 2)).astype(np.float32)
  flip = np.array([True, False, True])
  want = np.stack([x[0, :, ::-1], x[1], x[2, :, ::-1]])
  np.testing.assert_array_equal(np.asarray(overlap.unflip(x, flip)), want)


def test_overlap_rejects_bad_boxes():
  with pytest.raises(ValueError, match=r'\[B, 4\]'):
    overlap.batched_overlap_index_map(np.zeros((2, 3)), np.zeros((2, 3)), (4, 4))


SWITCHES = [
  dict(pos_threshold=0.75, directional=True, filter_negatives=True),
  dict(pos_threshold=0.0, directional=False, filter_negatives=False),
]


@pytest.mark.parametrize('switches', SWITCHES)
def test_dc_loss_from_views_matches_per_image_reference(switches):
  batch = make_batch(seed=int(switches['directional']))
  ref12, ref21, ref_g1, ref_g2 = torch_reference(batch, temperature=0.1, **switches)
  loss, aux, (g1, g2) = run_jax(batch, key=None, temperature=0.1, chunk_size=64, **switches)
  assert ref12 > 0.5 and ref21 > 0.5  # both directions have active anchors
  # D = 8, τ = 0.1: a logit is off by ~sqrt(8) EPS / τ = 1.7e-6, l_k = lse -
  # pos by ~3.4e-6 of ~10: 3e-7 relative, the weighted means less. rtol
  # 1e-5: 30x (measured 9e-8). A wrong overlap, flip or mask: > 1e-2.
  np.testing.assert_allclose(float(aux['loss_12']), ref12, rtol=1e-5)
  np.testing.assert_allclose(float(aux['loss_21']), ref21, rtol=1e-5)
  np.testing.assert_allclose(loss, ref12 + ref21, rtol=1e-5)
  # Gradient entries: logit error x their terms (<= 2x the largest entry),
  # whatever the entry's size: ~3.4e-6 of the largest entry at worst, atol
  # 1e-5 of it (measured 1.3e-7 of it). A cell mapped to the wrong place
  # moves an entry by O(its size).
  scale = max(np.abs(ref_g1).max(), np.abs(ref_g2).max())
  np.testing.assert_allclose(g1, ref_g1, atol=1e-5 * scale)
  np.testing.assert_allclose(g2, ref_g2, atol=1e-5 * scale)
  # Bookkeeping: overlap and active fractions, this step's negatives.
  b, h, w, d = batch['proj1'].shape
  sizes = [(bx[2] - bx[0]) * (bx[3] - bx[1]) // 64 for bx in batch['box1']]
  # An exact count over an exact count: one float32 rounding, <= EPS. rtol
  # 1e-6; one cell off changes it by 1/196 = 5e-3.
  np.testing.assert_allclose(float(aux['overlap_frac']), sum(sizes) / (b * h * w), rtol=1e-6)
  if switches['directional']:
    assert 0 < float(aux['active_frac_12']) + float(aux['active_frac_21']) <= 1
  else:  # γ = 0 and no direction: every overlap cell is active both ways
    assert float(aux['active_frac_12']) == float(aux['active_frac_21']) == 1.0
  assert aux['new_neg_feats'].shape == (2 * b * h * w, d)
  assert aux['new_neg_labels'].shape == (2 * b * h * w,)


def test_dc_loss_from_views_subsampled_negatives():
  batch = make_batch(seed=2)
  b, h, w, d = batch['proj1'].shape
  n = 5
  kw = dict(temperature=0.1, pos_threshold=0.5, directional=True, filter_negatives=True)
  loss, aux, (g1, _) = run_jax(batch, key=jax.random.key(0), neg_per_image=n, chunk_size=16, **kw)
  feats = np.asarray(aux['new_neg_feats']).reshape(b, 2, n, d)
  labels = np.asarray(aux['new_neg_labels']).reshape(b, 2, n)
  # Each sampled negative is a distinct cell of that image's view, with the
  # argmax pseudo-label of that cell.
  for i in range(b):
    for v, (proj, logits) in enumerate((('proj1', 'logits1'), ('proj2', 'logits2'))):
      cells = batch[proj][i].reshape(-1, d)
      cell_labels = batch[logits][i].reshape(-1, batch[logits].shape[-1]).argmax(-1)
      idx = [int(np.argmin(np.abs(cells - f).sum(-1))) for f in feats[i, v]]
      assert len(set(idx)) == n
      np.testing.assert_array_equal(cells[idx], feats[i, v])
      np.testing.assert_array_equal(cell_labels[idx], labels[i, v])
  # And the loss uses exactly those negatives (plus the bank).
  ref12, ref21, ref_g1, _ = torch_reference(
    batch, negatives=(aux['new_neg_feats'], aux['new_neg_labels']), **kw
  )
  # Tolerances as derived in the test above (same τ, D); a wrong sampled
  # negative changes a per-anchor loss by O(1/#negatives) = O(1e-2).
  np.testing.assert_allclose(loss, ref12 + ref21, rtol=1e-5)
  np.testing.assert_allclose(g1, ref_g1, atol=1e-5 * np.abs(ref_g1).max())
  with pytest.raises(ValueError, match='PRNG key'):
    run_jax(batch, key=None, neg_per_image=n, **kw)


def test_dc_loss_from_views_sharded_on_8_devices_matches_one_device():
  # The train step runs this under jax.jit on a global batch sharded on the
  # mesh axis 'data', with a replicated bank; the result must not depend on
  # the partitioning (every anchor still sees every image's negatives).
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  batch = make_batch(seed=3, b=8, crop=32)
  kw = dict(
    key=jax.random.key(1),
    temperature=0.1,
    pos_threshold=0.5,
    directional=True,
    filter_negatives=True,
    neg_per_image=6,
    chunk_size=32,
  )
  bank_keys = ('bank_feats', 'bank_labels', 'bank_valid')

  def f(proj1, proj2, rest):
    loss, aux = losses.dc_loss_from_views(proj1, proj2, **rest, **kw)
    return loss, aux['new_neg_feats']

  grad_fn = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
  rest = {k: v for k, v in batch.items() if k not in ('proj1', 'proj2')}
  (want, want_negs), want_g = jax.jit(grad_fn)(batch['proj1'], batch['proj2'], rest)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  sharded = {k: put(v, P() if k in bank_keys else P('data')) for k, v in batch.items()}
  (got, got_negs), got_g = jax.jit(grad_fn)(
    sharded['proj1'],
    sharded['proj2'],
    {k: v for k, v in sharded.items() if k not in ('proj1', 'proj2')},
  )
  assert sharded['proj1'].sharding.spec == P('data')
  # Same float32 arithmetic per anchor; only the sums over anchors (Σ w l
  # and Σ w over 8*16 cells: per-device partials, then an all-reduce) may
  # run in another order: <= log2(128) + 7 ~ 14 roundings of positive terms,
  # 8e-7 relative. rtol 1e-5: 12x (measured: equal). Negatives taken from
  # the local device only would lower every lse by ~log 8: > 10%.
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got_negs), np.asarray(want_negs))
  # Gradient entries: if the partitioner re-blocks a row's matmuls, an entry
  # is off by at most the float32 error of the float64 comparisons above,
  # relative to its terms (<= 2x the largest entry), not to itself: atol
  # 1e-5 of the largest entry, no rtol (measured: 1 ulp, 1e-7 of it).
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(
      np.asarray(g), np.asarray(w), rtol=0, atol=1e-5 * np.abs(np.asarray(w)).max()
    )
