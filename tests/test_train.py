"""End-to-end training: sharded step, checkpoints, resume, TensorBoard."""
import jax
import numpy as np
import pytest

from cac_jax import optim, sharding, train, train_state, train_step
from cac_jax.data import pipeline
from cac_jax.models import build_model
from cac_jax import checkpoint as ckpt_lib

from train_utils import read_scalars, tiny_config


def _params(workdir, step=None):
  config = tiny_config()
  model = build_model(config.model, num_classes=config.data.num_classes)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh()
  manager = ckpt_lib.make_manager(workdir, 2)
  state = ckpt_lib.restore(manager, train_state.abstract_state(model, tx, config, mesh), step)
  return jax.device_get(state)


def test_train_and_evaluate_end_to_end(tmp_path):
  workdir = str(tmp_path / 'run')
  scores = train.train_and_evaluate(tiny_config(), workdir)
  assert 0.0 <= scores['miou'] <= 1.0
  assert set(ckpt_lib.make_manager(workdir, 2).all_steps()) == {2, 4}
  scalars = read_scalars(workdir)
  assert sorted(scalars['train/loss_ce']) == [1, 2, 3, 4]
  for step in (1, 2, 3, 4):  # every loss finite, every step logged once
    assert len(scalars['train/loss_ce'][step]) == 1
    assert np.isfinite(scalars['train/loss'][step][0])
  # The DC loss only exists from unsup_start_step=2 (steps 3 and 4) and is active.
  assert sorted(scalars['train/loss_dc']) == [3, 4]
  assert all(v[0] > 0 for v in scalars['train/loss_dc'].values())
  assert scalars['train/active_frac_12'][4][0] > 0
  assert scalars['train/bank_fill'][4][0] == 1.0  # bank_steps=1: full after one DC step
  assert 'val/miou' in scalars and 4 in scalars['val/miou']
  # Input | ground truth | prediction for 3 val images, as PNGs.
  (images,), = read_scalars(workdir, images=True)['val/examples'].values()
  assert len(images) == 2 + 3  # clu: width, height, then one PNG per image
  assert bytes(images[2])[:8] == b'\x89PNG\r\n\x1a\n'
  assert (tmp_path / 'run' / 'config.json').exists()


def test_kill_and_resume_is_exact(tmp_path):
  """N steps in one go == k steps, stop, resume to N (same params, bit for bit)."""
  config = tiny_config()
  train.train_and_evaluate(config, str(tmp_path / 'full'))
  train.train_and_evaluate(config, str(tmp_path / 'split'), stop_after=1)
  assert ckpt_lib.make_manager(str(tmp_path / 'split'), 2).latest_step() == 1
  train.train_and_evaluate(config, str(tmp_path / 'split'))
  full, split = _params(str(tmp_path / 'full')), _params(str(tmp_path / 'split'))
  # Exact on CPU: same ops, same data (step-indexed stream), same keys.
  jax.tree.map(np.testing.assert_array_equal, full.params, split.params)
  jax.tree.map(np.testing.assert_array_equal, full.bank.feats, split.bank.feats)


def test_sharded_step_equals_single_device_step():
  """The same global batch on 8 devices and on 1 device gives the same update."""
  config = tiny_config()
  model = build_model(config.model, num_classes=config.data.num_classes)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  it = pipeline.train_iterator(config, start_step=0)
  batches = [next(it) for _ in range(3)]
  results = []
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh = sharding.make_mesh(devices)
    with jax.set_mesh(mesh):
      state, shardings = train_state.create_sharded_state(
          model, tx, config, mesh, jax.random.key(0))
      sup = train_step.make_train_step(model, tx, config, shardings, with_dc=False)
      dc = train_step.make_train_step(model, tx, config, shardings, with_dc=True)
      state, _ = sup(state, sharding.to_global({'labeled': batches[0]['labeled']}, mesh))
      for b in batches[1:]:
        state, metrics = dc(state, sharding.to_global(b, mesh))
      results.append((jax.device_get(state), jax.device_get(metrics)))
  (s8, m8), (s1, m1) = results
  # Reductions (BN statistics, loss means) are split differently over 8
  # devices, so float32 round-off differs: 1e-5 relative after 3 steps.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               s8.params, s1.params)
  np.testing.assert_allclose(m8['loss_dc'], m1['loss_dc'], rtol=1e-5)
  assert float(m8['loss_dc']) > 0


@pytest.mark.parametrize('projector', [True, False])
def test_dc_step_with_and_without_projector(projector):
  """The bank's width follows the DC features (128-d projector or 256-d decoder)."""
  config = tiny_config(**{'model.projector': projector})
  model = build_model(config.model, num_classes=config.data.num_classes)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh()
  batch = next(pipeline.train_iterator(config, start_step=0))
  with jax.set_mesh(mesh):
    state, shardings = train_state.create_sharded_state(model, tx, config, mesh,
                                                        jax.random.key(0))
    assert state.bank.feats.shape[1] == (config.model.proj_dim if projector else 256)
    dc = train_step.make_train_step(model, tx, config, shardings, with_dc=True)
    state, metrics = dc(state, sharding.to_global(batch, mesh))
  assert np.isfinite(float(metrics['loss_dc'])) and float(metrics['loss_dc']) > 0
  assert float(metrics['bank_fill']) == 1.0
