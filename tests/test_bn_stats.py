"""Where the BatchNorm running statistics come from (config.bn, cac_jax/precise_bn.py).

The first BatchNorm layer of the network (the ResNet stem's bn1) sees the
stem convolution of the images, a function of the parameters and the images
alone, so its statistics have a float64 NumPy reference: the 7x7 stride-2
convolution (torch's symmetric padding 3) by sliding windows, then per
channel the batch mean and the unbiased batch variance over batch x height
x width, and torch's momentum-0.1 running average. The other layers are
checked against each other (the supervised step, one device against eight).

Tolerances: the stem statistics are float32 sums over n = 8 x 32 x 32 =
8,192 values of 147-term products, off by at most ~log2(n) EPS = 13 EPS
(8e-7) relative to the terms they sum; mean atol 5e-6 x the channel's
standard deviation and var rtol 5e-6 are 6x over that, and tight enough
that a biased batch variance in the update (a change of 1/n = 1.2e-4 of the
batch variance, 1.2e-5 of the running one) fails.
"""

import json

import jax
import ml_collections
import numpy as np
import pytest

from cac_jax import checkpoint as ckpt_lib
from cac_jax import (
  config_lib,
  constants,
  evaluate,
  optim,
  precise_bn,
  saved_run,
  sharding,
  train,
  train_state,
  train_step,
)
from cac_jax.data import pipeline
from cac_jax.models import build_model
from train_utils import tiny_config, write_image

MOMENTUM = 0.1  # torch's convention: new = (1 - 0.1) old + 0.1 batch


def stem_conv(images, kernel):
  """float64 [B, H/2, W/2, O]: torch Conv2d(3, O, 7, stride=2, padding=3, bias=False)."""
  x = np.pad(np.asarray(images, np.float64), ((0, 0), (3, 3), (3, 3), (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(x, (7, 7), axis=(1, 2))
  windows = windows[:, ::2, ::2][:, : images.shape[1] // 2, : images.shape[2] // 2]
  return np.einsum('bijckl,klco->bijo', windows, np.asarray(kernel, np.float64))


def batch_moments(images, kernel):
  """(mean, unbiased var) per channel of the stem convolution of `images`."""
  y = stem_conv(images, kernel).reshape(-1, kernel.shape[-1])
  return y.mean(0), y.var(0, ddof=1)


def assert_stats_close(got, mean, var):
  np.testing.assert_allclose(got['mean'], mean, rtol=0, atol=5e-6 * np.sqrt(var).max())
  np.testing.assert_allclose(got['var'], var, rtol=5e-6)


def random_stats(rng, stats):
  """Random running statistics of the same structure (mean ~ N(0, 0.3), var ~ U(0.5, 2))."""
  return jax.tree_util.tree_map_with_path(
    lambda path, x: (
      rng.normal(0, 0.3, x.shape) if path[-1].key == 'mean' else rng.uniform(0.5, 2.0, x.shape)
    ).astype(np.float32),
    stats,
  )


@pytest.fixture(scope='module')
def setup():
  """Model, optimiser, mesh, a host copy of a fresh state, a DC batch's geometry."""
  config = tiny_config()
  model = build_model(config.model, num_classes=config.data.num_classes)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    state, shardings = train_state.create_sharded_state(model, tx, config, mesh, jax.random.key(0))
  geometry = next(pipeline.train_iterator(config, start_step=config.cac.unsup_start_step))
  return dict(
    config=config,
    model=model,
    tx=tx,
    mesh=mesh,
    shardings=shardings,
    state=jax.device_get(state),
    geometry=geometry,
  )


def _random_batch(rng, geometry):
  """The pipeline's batch (boxes, flips, labels) with fresh random N(0, 1) images."""
  batch = jax.tree.map(np.copy, geometry)
  for split, key in (('labeled', 'image'), ('unlabeled', 'image1'), ('unlabeled', 'image2')):
    batch[split][key] = rng.normal(size=batch[split][key].shape).astype(np.float32)
  return batch


_STEPS = {}


def _step(setup, mode, with_dc):
  """The compiled train step of `mode` (one per mode and kind, reused)."""
  if (mode, with_dc) not in _STEPS:
    config = tiny_config(**{'bn.running_stats': mode})
    _STEPS[mode, with_dc] = train_step.make_train_step(
      setup['model'], setup['tx'], config, setup['shardings'], with_dc=with_dc
    )
  return _STEPS[mode, with_dc]


def _run_step(setup, mode, with_dc, host_state, batch):
  mesh = setup['mesh']
  with jax.set_mesh(mesh):
    state = jax.device_put(host_state, setup['shardings'])
    if not with_dc:
      batch = {'labeled': batch['labeled']}
    new_state, _ = _step(setup, mode, with_dc)(state, sharding.to_global(batch, mesh))
  return jax.device_get(new_state.batch_stats)


def test_dc_step_running_stats_follow_the_mode(setup):
  """'all': bn1 = three running-average updates (labeled, view 1, view 2); 'labeled':
  one (the labeled batch), and every layer as after the supervised-only step."""
  rng = np.random.default_rng()
  host = setup['state']
  host = host.replace(
    step=np.int32(setup['config'].cac.unsup_start_step),
    batch_stats=random_stats(rng, host.batch_stats),
  )
  batch = _random_batch(rng, setup['geometry'])
  kernel = host.params['backbone']['conv1']['kernel']  # before the update
  prior = host.batch_stats['backbone']['bn1']
  # Every layer is also compared with the supervised-only step from the same
  # state: its one pass is the DC step's labeled pass (same parameters,
  # images and dropout key). The two programs differ around it, so XLA may
  # order the deeper layers' sums differently: rtol 1e-5 (measured: 0, bit
  # for bit). Threading the views in ('all') moves every tensor by more
  # than 1e-3 of itself (measured: >= 0.12).
  sup = _run_step(setup, 'all', False, host, batch)
  for mode in ('all', 'labeled'):
    got = _run_step(setup, mode, True, host, batch)
    images = [batch['labeled']['image']]
    if mode == 'all':
      images += [batch['unlabeled']['image1'], batch['unlabeled']['image2']]
    mean, var = (np.asarray(prior[k], np.float64) for k in ('mean', 'var'))
    for x in images:
      m, v = batch_moments(x, kernel)
      mean = (1 - MOMENTUM) * mean + MOMENTUM * m
      var = (1 - MOMENTUM) * var + MOMENTUM * v
    assert_stats_close(got['backbone']['bn1'], mean, var)
    gaps = [
      np.max(np.abs(a - b) / np.abs(b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(sup))
    ]
    if mode == 'labeled':
      assert max(gaps) <= 1e-5, max(gaps)
    else:
      assert min(gaps) > 1e-3, min(gaps)


def _estimate(setup, params, batch_stats, batches, devices=None):
  mesh = sharding.make_mesh(devices)
  model = setup['model']
  with jax.set_mesh(mesh):
    params, batch_stats = jax.device_put((params, batch_stats), sharding.replicated(mesh))
    fns = precise_bn.make_estimate_fns(model, mesh, seed=0)
    return jax.device_get(precise_bn.estimate(fns, params, batch_stats, batches, mesh))


def test_precise_statistics_pool_the_batches(setup):
  """bn1 = pycls's pooled statistics over the batches; independent of the prior
  statistics (bit for bit); one device and the 8-device mesh agree."""
  rng = np.random.default_rng()
  host = setup['state']
  batches = [{'image': rng.normal(0.3, 1.5, (8, 64, 64, 3)).astype(np.float32)} for _ in range(3)]
  got = _estimate(setup, host.params, random_stats(rng, host.batch_stats), batches)
  kernel = host.params['backbone']['conv1']['kernel']
  moments = [batch_moments(b['image'], kernel) for b in batches]
  mean = np.mean([m for m, _ in moments], 0)
  var = np.mean([v + m**2 for m, v in moments], 0) - mean**2  # pycls
  assert_stats_close(got['backbone']['bn1'], mean, var)

  again = _estimate(setup, host.params, random_stats(rng, host.batch_stats), batches)
  jax.tree.map(np.testing.assert_array_equal, again, got)

  # One device: the same global batches, reduced in one place instead of per
  # device and then across. Deeper layers normalise with batch statistics
  # that differ by round-off, which the network carries on. Each tensor is
  # measured against its own largest entry (a channel mean near 0 has no
  # relative error to speak of): <= 5e-5; the largest tensor's gap over 400
  # fresh draws: median 4.2e-6, max 1.1e-5. Statistics per device (one image
  # each) instead of over the global batch are off by a median 2.5e-2 of the
  # same scale.
  one = _estimate(setup, host.params, host.batch_stats, batches, jax.devices()[:1])
  gaps = [
    np.abs(a - b).max() / np.abs(b).max()
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(got))
  ]
  assert max(gaps) <= 5e-5, max(gaps)


def _folder_dataset(root, sizes, rng):
  """A folder dataset whose labeled images have the given (h, w); returns them."""
  images = {}
  for k, (h, w) in enumerate(sizes):
    images[f'a{k}'] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    write_image(root / 'images' / f'a{k}.png', images[f'a{k}'])
    write_image(root / 'masks' / f'a{k}.png', rng.integers(0, 3, (h, w), dtype=np.uint8))
  (root / 'splits').mkdir()
  (root / 'splits' / 'labeled.txt').write_text('\n'.join(images) + '\n')
  (root / 'splits' / 'val.txt').write_text('a0\n')
  (root / 'splits' / 'unlabeled.txt').write_text('a0\n')
  return images


def test_estimation_images_are_unaugmented_centre_crops(tmp_path):
  """Each labeled image at its own size, padded bottom/right with the mean colour
  to the crop, its centre crop, normalised; every image once per pass over the
  split; hosts' shares concatenate to the one-host batch; the same every call."""
  rng = np.random.default_rng()
  sizes = [(50, 90), (80, 70), (64, 64), (100, 40)]
  images = _folder_dataset(tmp_path, sizes, rng)
  config = tiny_config(
    **{
      'data.name': 'folder',
      'data.root': str(tmp_path),
      'data.num_classes': 3,
      'data.labeled_batch_size': 4,
    }
  )
  (batch,) = list(
    pipeline.bn_stats_iterator(config, num_batches=1, process_count=1, process_index=0)
  )
  crop = config.data.crop_size
  want = []
  for image in images.values():
    h, w = image.shape[:2]
    canvas = np.broadcast_to(
      255.0 * np.asarray(constants.IMAGENET_MEAN), (max(h, crop), max(w, crop), 3)
    ).copy()
    canvas[:h, :w] = image
    top, left = (canvas.shape[0] - crop) // 2, (canvas.shape[1] - crop) // 2
    window = canvas[top : top + crop, left : left + crop] / 255.0
    want.append((window - constants.IMAGENET_MEAN) / constants.IMAGENET_STD)
  got = batch['image']
  assert got.shape == (4, crop, crop, 3)
  # Which image each slot holds (a seeded order): the nearest reference.
  order = [int(np.argmin([np.abs(g - w).max() for w in want])) for g in got]
  assert sorted(order) == [0, 1, 2, 3]
  for g, k in zip(got, order):  # float32 division: a few ulp of |x| <= 2.7
    np.testing.assert_allclose(g, want[k], rtol=0, atol=1e-6)

  shares = [
    list(pipeline.bn_stats_iterator(config, num_batches=2, process_count=2, process_index=p))
    for p in (0, 1)
  ]
  two = list(pipeline.bn_stats_iterator(config, num_batches=2, process_count=1, process_index=0))
  np.testing.assert_array_equal(two[0]['image'], got)
  for i in range(2):
    np.testing.assert_array_equal(
      np.concatenate([shares[0][i]['image'], shares[1][i]['image']]), two[i]['image']
    )


def test_precise_run_saves_the_statistics_it_scored(tmp_path):
  """A tiny run with 'precise': every checkpoint holds the estimate from its own
  parameters, and evaluating the checkpoint gives the logged mIoU exactly; a
  copy whose config predates `bn` (an old run) evaluates the same."""
  # Supervised only: the loop's re-estimation does not depend on the DC
  # passes (tested above), and the run is half as long.
  config = tiny_config(
    **{
      'bn.running_stats': 'precise',
      'bn.precise_batches': 2,
      'eval.num_images_logged': 0,
      'cac.supervised_only': True,
    }
  )
  workdir = str(tmp_path / 'run')
  scores = train.train_and_evaluate(config, workdir)
  history = json.loads((tmp_path / 'run' / 'val_history.json').read_text())
  assert history == {'4': scores['miou']}
  got, _, step, _ = evaluate.evaluate_run(workdir, step=4)
  assert step == 4 and 'pixel_acc' in got
  assert got == {k: v for k, v in scores.items() if k in got}  # mIoU, per class, pixels

  model = build_model(config.model, num_classes=config.data.num_classes)
  mesh = sharding.make_mesh()
  manager = ckpt_lib.make_manager(workdir, 2)
  abstract = train_state.abstract_variables(model, config, mesh)
  fns = precise_bn.make_estimate_fns(model, mesh, int(config.seed))
  for saved_step in (2, 4):
    saved = ckpt_lib.restore(manager, abstract, saved_step)
    with jax.set_mesh(mesh):
      fresh = precise_bn.estimate(
        fns,
        saved['params'],
        saved['batch_stats'],
        pipeline.bn_stats_iterator(config, num_batches=2),
        mesh,
      )
    jax.tree.map(
      np.testing.assert_array_equal, jax.device_get(saved['batch_stats']), jax.device_get(fresh)
    )

  # The same checkpoint, its config as a run made before `bn` existed saved it.
  old = config.to_dict()
  del old['bn']
  old_dir = tmp_path / 'old'
  state = ckpt_lib.restore(manager, abstract, 4)
  copy = ckpt_lib.make_manager(str(old_dir), 1)
  ckpt_lib.save(copy, 4, {'step': np.int32(4), **state}, ml_collections.ConfigDict(old))
  copy.wait_until_finished()
  copy.close()
  manager.close()
  loaded, _, _, _ = saved_run.load_run(str(old_dir))
  assert loaded.bn.running_stats == 'all' and loaded.bn.precise_batches == 8
  config_lib.validate(loaded, num_devices=1)
  old_scores, _, _, _ = evaluate.evaluate_run(str(old_dir))
  assert old_scores == got


def test_bad_bn_config_is_a_clear_error():
  config = tiny_config(**{'bn.running_stats': 'unlabeled', 'bn.precise_batches': 0})
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, num_devices=1)
  text = str(error.value)
  assert "bn.running_stats='unlabeled' is not one of 'all', 'labeled', 'precise'" in text
  assert 'bn.precise_batches=0 must be a positive integer' in text
