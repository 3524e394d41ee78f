"""The feature bank: a FIFO ring buffer of past steps' DC-loss negatives.

CAC (docs/method.md §4) contrasts each anchor with the negatives of the current
step AND of the previous `bank_steps` steps. Every step produces the same
number M of negatives (both views of every unlabeled image), so a bank of
capacity `bank_steps · M` written M rows at a time at a pointer that advances
by M never wraps inside a write: one `dynamic_update_slice` per step, fully
functional and jit-friendly. The bank lives in the (replicated) train state;
rows not yet written are marked invalid so that warm-up needs no special
case. Nothing here imports TensorFlow.
"""

import flax
import jax
import jax.numpy as jnp
from jax import lax


@flax.struct.dataclass
class FeatureBank:
  """Ring buffer of negatives.

  Attributes:
    feats: float32 [C, D] unit-norm projected features.
    labels: int32 [C] their pseudo-labels.
    valid: bool [C] rows written at least once.
    ptr: int32 scalar, the row the next push writes first.
  """

  feats: jax.Array
  labels: jax.Array
  valid: jax.Array
  ptr: jax.Array

  @property
  def capacity(self) -> int:
    return self.feats.shape[0]


def bank_capacity(bank_steps: int, negatives_per_step: int) -> int:
  """Rows needed to hold the negatives of the last `bank_steps` steps."""
  if bank_steps < 0 or negatives_per_step < 0:
    raise ValueError(
      f'bank_steps and negatives_per_step must be >= 0; got {bank_steps} and {negatives_per_step}.'
    )
  return int(bank_steps) * int(negatives_per_step)


def init_bank(capacity: int, dim: int) -> FeatureBank:
  """An empty bank (all rows invalid); capacity 0 gives [0, dim] arrays."""
  if capacity < 0 or dim < 1:
    raise ValueError(f'need capacity >= 0 and dim >= 1; got {capacity}, {dim}.')
  return FeatureBank(
    feats=jnp.zeros((capacity, dim), jnp.float32),
    labels=jnp.zeros((capacity,), jnp.int32),
    valid=jnp.zeros((capacity,), bool),
    ptr=jnp.zeros((), jnp.int32),
  )


def push(bank: FeatureBank, feats, labels) -> FeatureBank:
  """Writes M new rows at `ptr`, overwriting the oldest; returns a new bank.

  Args:
    bank: the current bank, capacity C a multiple of M (or 0: no-op).
    feats: [M, D] new negatives (any float dtype; stored as float32).
    labels: int [M] their pseudo-labels.

  Returns:
    The updated bank; `ptr` advances by M modulo C.
  """
  capacity, dim = bank.feats.shape
  if feats.ndim != 2 or feats.shape[1] != dim or labels.shape != feats.shape[:1]:
    raise ValueError(
      f'push expects feats [M, {dim}] and labels [M]; got {feats.shape} and {labels.shape}.'
    )
  m = feats.shape[0]
  if capacity == 0 or m == 0:
    return bank
  if capacity % m:
    raise ValueError(
      f'bank capacity {capacity} is not a multiple of the {m} rows pushed per '
      f'step; build it with bank_capacity(bank_steps, {m}).'
    )
  start = bank.ptr
  return bank.replace(
    feats=lax.dynamic_update_slice_in_dim(bank.feats, feats.astype(jnp.float32), start, axis=0),
    labels=lax.dynamic_update_slice_in_dim(bank.labels, labels.astype(jnp.int32), start, axis=0),
    valid=lax.dynamic_update_slice_in_dim(bank.valid, jnp.ones((m,), bool), start, axis=0),
    ptr=((start + m) % capacity).astype(jnp.int32),
  )
