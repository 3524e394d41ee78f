"""The feature bank: FIFO order, wrap-around, warm-up validity, capacity 0, and
the same contents under a replicated jit on 8 fake devices as on one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from cac_jax import bank as bank_lib


def _step_rows(step, m=4, d=3):
  """Distinguishable rows for push number `step`."""
  feats = np.arange(m * d, dtype=np.float32).reshape(m, d) + 100 * step
  labels = np.arange(m, dtype=np.int32) + 10 * step
  return feats, labels


def reference_fifo(pushes, capacity):
  """Plain-Python FIFO: the last `capacity` rows pushed, at ring positions."""
  feats = np.zeros((capacity, pushes[0][0].shape[1]), np.float32)
  labels = np.zeros((capacity,), np.int32)
  valid = np.zeros((capacity,), bool)
  row = 0
  for f, l in pushes:
    for i in range(len(l)):
      feats[row], labels[row], valid[row] = f[i], l[i], True
      row = (row + 1) % capacity
  return feats, labels, valid, row


def test_capacity_and_init():
  assert bank_lib.bank_capacity(2, 6) == 12
  assert bank_lib.bank_capacity(0, 6) == 0
  bank = bank_lib.init_bank(12, 5)
  assert bank.feats.shape == (12, 5) and bank.feats.dtype == jnp.float32
  assert bank.labels.dtype == jnp.int32 and bank.valid.dtype == jnp.bool_
  assert not np.any(bank.valid) and int(bank.ptr) == 0
  with pytest.raises(ValueError, match='>= 0'):
    bank_lib.bank_capacity(-1, 6)


@pytest.mark.parametrize('bank_steps', [1, 3])
def test_push_is_fifo_with_wraparound_and_warmup(bank_steps):
  m, d = 4, 3
  capacity = bank_lib.bank_capacity(bank_steps, m)
  bank = bank_lib.init_bank(capacity, d)
  push = jax.jit(bank_lib.push)
  pushes = []
  for step in range(2 * bank_steps + 1):  # wraps around at least twice
    pushes.append(_step_rows(step, m, d))
    bank = push(bank, *map(jnp.asarray, pushes[-1]))
    feats, labels, valid, ptr = reference_fifo(pushes, capacity)
    np.testing.assert_array_equal(np.asarray(bank.feats), feats)
    np.testing.assert_array_equal(np.asarray(bank.labels), labels)
    np.testing.assert_array_equal(np.asarray(bank.valid), valid)
    assert int(bank.ptr) == ptr
    # Warm-up: valid rows = rows pushed so far, capped at the capacity.
    assert int(np.sum(bank.valid)) == min(m * (step + 1), capacity)
    # The bank holds exactly the last `bank_steps` pushes.
    held = sorted(np.asarray(bank.labels)[np.asarray(bank.valid)].tolist())
    expect = sorted(l for f, ls in pushes[-bank_steps:] for l in ls.tolist())
    assert held == expect


def test_capacity_zero_is_a_noop():
  bank = bank_lib.init_bank(0, 8)
  assert bank.feats.shape == (0, 8)
  out = bank_lib.push(bank, jnp.ones((4, 8)), jnp.zeros((4,), jnp.int32))
  assert out.feats.shape == (0, 8) and int(out.ptr) == 0


def test_push_rejects_bad_shapes():
  bank = bank_lib.init_bank(12, 3)
  with pytest.raises(ValueError, match='not a multiple'):
    bank_lib.push(bank, jnp.ones((5, 3)), jnp.zeros((5,), jnp.int32))
  with pytest.raises(ValueError, match='feats'):
    bank_lib.push(bank, jnp.ones((4, 2)), jnp.zeros((4,), jnp.int32))


def test_replicated_push_on_8_devices_matches_one_device():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P('data'))
  m, d, steps = 16, 5, 3
  capacity = bank_lib.bank_capacity(2, m)
  rng = np.random.default_rng(0)
  pushes = [
    (rng.normal(size=(m, d)).astype(np.float32), rng.integers(0, 9, m).astype(np.int32))
    for _ in range(steps)
  ]

  single = bank_lib.init_bank(capacity, d)
  for f, l in pushes:
    single = jax.jit(bank_lib.push)(single, f, l)

  sharded_push = jax.jit(bank_lib.push, out_shardings=replicated)
  bank = jax.device_put(bank_lib.init_bank(capacity, d), replicated)
  for f, l in pushes:
    # New negatives arrive sharded like the batch they came from.
    bank = sharded_push(bank, jax.device_put(f, data), jax.device_put(l, data))
  assert bank.feats.sharding.is_fully_replicated
  for got, want in zip(jax.tree.leaves(bank), jax.tree.leaves(single)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Every device holds the same full copy.
  for shard in bank.feats.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(single.feats))
