"""The DC step's three passes as one call (cac.fused_passes, layers.batch_groups).

One grouped BatchNorm layer is checked against float64 NumPy: each group
normalised with its own batch mean and biased variance, the running averages
updated group after group with torch's momentum 0.1 and unbiased variance.
Whole DC steps are checked against the three-pass step from the same state
and batches, dropout on: the fused call draws each group's masks with that
pass's own key, so the two steps differ by float summation order only.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cac_jax import optim, sharding, train_state, train_step
from cac_jax.data import pipeline
from cac_jax.models import build_model, layers
from train_utils import assert_updates_close, tiny_config

MOMENTUM = 0.1  # torch's convention
EPS = 2.0**-24  # float32 unit roundoff


class _Norm(nn.Module):
  @nn.compact
  def __call__(self, x):
    return layers.batch_norm(True, jnp.float32, 'bn')(x)


def _numpy_grouped_bn(parts, scale, bias, mean, var, stat_groups):
  """float64 reference: per-group normalisation, running stats threaded in order."""
  outs = []
  for g, x in enumerate(parts):
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    m, v = x.mean(0), x.var(0)
    outs.append((x - m) / np.sqrt(v + layers.BN_EPSILON) * scale + bias)
    if g < stat_groups:
      mean = (1 - MOMENTUM) * mean + MOMENTUM * m
      var = (1 - MOMENTUM) * var + MOMENTUM * x.var(0, ddof=1)
  return outs, mean, var


@pytest.mark.parametrize('spatial, stat_groups', [((5, 5), 3), ((1, 1), 3), ((5, 5), 1)])
def test_grouped_batch_norm_matches_float64(spatial, stat_groups):
  """(1, 1) is the ASPP image-pooling branch: n = the group's batch (4 values)."""
  rng = np.random.default_rng()
  c = 6
  # Groups with different offsets and spreads, so that pooled statistics fail.
  parts = [rng.normal(3 * g - 2, 1 + g, (4,) + spatial + (c,)).astype(np.float32) for g in range(3)]
  scale, bias = rng.uniform(0.5, 2, c), rng.normal(0, 1, c)
  mean, var = rng.normal(0, 0.3, c), rng.uniform(0.5, 2, c)
  variables = {
    'params': {'bn': {'scale': scale.astype(np.float32), 'bias': bias.astype(np.float32)}},
    'batch_stats': {'bn': {'mean': mean.astype(np.float32), 'var': var.astype(np.float32)}},
  }
  with layers.batch_groups(3, shards=2, stat_groups=stat_groups) as groups:
    y, mutated = _Norm().apply(
      variables, groups.merge([jnp.asarray(p) for p in parts]), mutable=['batch_stats']
    )
  got = groups.split(y)
  want, want_mean, want_var = _numpy_grouped_bn(parts, scale, bias, mean, var, stat_groups)
  # The variance is E[x^2] - E[x]^2 in float32 (flax's fast variance): its
  # error is a few EPS of E[x^2], i.e. E[x^2] / var times EPS relative to var,
  # which scales y - bias (through 1/sqrt(var)) and, with the mean's error,
  # the output. With 4 values per channel (spatial 1x1) that ratio reaches
  # the hundreds; the bound is 8 EPS of it, plus 2e-5 for the sums (600 x 3
  # seeded draws: at most 0.38 of the bound; a fixed 2e-5 was exceeded up to 8x).
  for g, w, x in zip(got, want, parts):
    x = np.asarray(x, np.float64).reshape(-1, c)
    cond = np.mean(x**2, 0) / (x.var(0) + layers.BN_EPSILON)
    tol = 2e-5 + 8 * EPS * cond * (np.abs(w - bias) + scale)
    err = np.abs(np.asarray(g).reshape(w.shape) - w)
    assert np.all(err <= tol), (err / tol).max()
  stats = mutated['batch_stats']['bn']
  np.testing.assert_allclose(stats['mean'], want_mean, rtol=0, atol=1e-5)
  np.testing.assert_allclose(stats['var'], want_var, rtol=1e-5)


class _Drop(nn.Module):
  @nn.compact
  def __call__(self, x):
    return layers.Dropout(0.5, deterministic=False)(x)


def test_grouped_dropout_draws_each_groups_own_mask():
  """Grouped: group g's mask is the one an ungrouped call with key g draws, bit for bit."""
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) + 3
  keys = list(jax.random.split(jax.random.key(np.random.randint(2**31)), 3))
  alone = [_Drop().apply({}, x, rngs={'dropout': k}) for k in keys]
  with layers.batch_groups(3, shards=4) as groups:
    fused = _Drop().apply({}, groups.merge([x] * 3), rngs=layers.group_rngs(keys))
  for a, f in zip(alone, groups.split(fused)):
    np.testing.assert_array_equal(a, f)
  assert not np.array_equal(alone[0], alone[1])  # the keys do reach the masks


def test_grouped_batch_norm_refuses_a_valid_region():
  x = jnp.ones((6, 8, 8, 2))
  with layers.batch_groups(3), layers.valid_region(jnp.full((6, 2), 8), (8, 8)):
    with pytest.raises(ValueError, match='valid_region'):
      _Norm().init(jax.random.key(0), x)


STEPS = 3


@pytest.fixture(scope='module')
def setup():
  """Model, optimiser, a host copy of a fresh state, STEPS DC batches."""
  config = tiny_config()
  model = build_model(config.model, num_classes=config.data.num_classes)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    state, _ = train_state.create_sharded_state(model, tx, config, mesh, jax.random.key(0))
  # The pipeline's boxes, flips and labels, with fresh N(0, 1) images.
  rng = np.random.default_rng()
  batches = []
  it = pipeline.train_iterator(config, start_step=config.cac.unsup_start_step)
  for _ in range(STEPS):
    batch = jax.tree.map(np.copy, next(it))
    for split, key in (('labeled', 'image'), ('unlabeled', 'image1'), ('unlabeled', 'image2')):
      batch[split][key] = rng.normal(size=batch[split][key].shape).astype(np.float32)
    batches.append(batch)
  host = jax.device_get(state)
  return dict(model=model, tx=tx, host=host, batches=batches, start=config.cac.unsup_start_step)


def _run(setup, devices, mode, fused):
  """STEPS DC steps on a mesh over `devices`: (final host state, metrics per step)."""
  config = tiny_config(**{'bn.running_stats': mode, 'cac.fused_passes': fused})
  mesh = sharding.make_mesh(devices)
  with jax.set_mesh(mesh):
    repl = sharding.replicated(mesh)  # the state is replicated (cac_jax/sharding.py)
    host = setup['host'].replace(step=np.int32(setup['start']))
    state = jax.device_put(host, repl)
    shardings = jax.tree.map(lambda _: repl, state)
    step = train_step.make_train_step(setup['model'], setup['tx'], config, shardings, with_dc=True)
    metrics = []
    for batch in setup['batches']:
      state, m = step(state, sharding.to_global(batch, mesh))
      metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


# One device for the authors' statistics only: the sharded batch (8 devices)
# is where a per-device or wrongly grouped statistic would show, in each mode.
@pytest.mark.parametrize('mode,n_devices', [('all', 1), ('all', 8), ('labeled', 8)])
def test_fused_step_equals_three_passes(setup, n_devices, mode):
  """Parameters, running statistics and metrics after STEPS DC steps, dropout on.

  On 8 devices each group is a sharded batch, so a per-device statistic
  would fail here. The two programs sum in different orders (one call of 3B
  against three of B), a few EPS per tensor, which each DC step amplifies
  (measured after 3 steps: parameters' median excess 6e-4 of the tensor's
  largest update, max 3e-2; running statistics the same or less), hence
  test_train.py's smooth_frac 1e-2 and flip_frac 0.2, for the statistics
  too (their update is the steps' threading of batch statistics). Drawing
  the views' dropout masks with each other's key instead moves the medians
  to 0.18 (parameters) and the statistics' max by 98x. Metrics: the first
  step sees identical parameters, so the forward's values differ by summation
  order only: 1e-4 of max(|value|, 1) (a gap or a cosine is a difference of
  terms of order 1 or more). grad_norm also sums the backward, where a ReLU
  or max-pool decision tipped by that round-off moves terms discretely:
  1e-2 relative (300 fresh draws: median 7e-7, max 7.2e-4, one above 1e-4;
  the forward values' largest was 6.6e-5 of the gap's value, 2.6e-7 of the
  rest). Later steps carry the amplified parameter gap: 5e-2 (steps 1 and 2,
  60 fresh draws: at most 1.5e-3 relative, discrete counts included).
  """
  devices = jax.devices()[:n_devices]
  want, want_m = _run(setup, devices, mode, 'off')
  got, got_m = _run(setup, devices, mode, 'on')
  init = setup['host']
  assert_updates_close(
    got.params, want.params, init.params, steps=STEPS, flip_frac=0.2, smooth_frac=1e-2
  )
  assert_updates_close(
    got.batch_stats,
    want.batch_stats,
    init.batch_stats,
    steps=STEPS,
    flip_frac=0.2,
    smooth_frac=1e-2,
  )
  assert np.array_equal(got.step, want.step)
  for k, (g, w) in enumerate(zip(got_m, want_m)):
    assert set(g) == set(w)
    for name in w:
      value = abs(float(w[name]))
      if k > 0:
        scale, tol = max(value, 1e-3), 5e-2
      elif name == 'grad_norm':
        scale, tol = value, 1e-2
      else:
        scale, tol = max(value, 1.0), 1e-4
      assert abs(float(g[name]) - float(w[name])) <= tol * scale, (k, name, g[name], w[name])


def test_fused_passes_need_one_batch_shape():
  """'on' with labeled and unlabeled batches of different sizes is a clear error."""
  cac = tiny_config(**{'cac.fused_passes': 'on'}).cac
  image = lambda n: jax.ShapeDtypeStruct((n, 64, 64, 3), jnp.float32)
  assert train_step._fusable(cac, {'image': image(8)}, {'image1': image(8), 'image2': image(8)})
  with pytest.raises(ValueError, match='one shape'):
    train_step._fusable(cac, {'image': image(8)}, {'image1': image(4), 'image2': image(4)})
