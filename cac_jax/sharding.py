"""Mesh and shardings: one 'data' axis over every device of every host.

Parameters, optimiser state and the feature bank are replicated; batches are
split along their leading (batch) axis. Host batches become global arrays with
`to_global`, the one place where host data enters the devices.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all devices).

  The axis type is Auto on purpose: `jax.make_mesh` defaults to Explicit
  axes, under which Linen's Dropout fails inside `jax.set_mesh`.
  """
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
  """Leading axis split over 'data'; the other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(name: str, global_batch: int, mesh) -> None:
  """Raises a clear error if a global batch cannot be split over the mesh."""
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(
      f'{name}={global_batch} is not divisible by the {n} devices of the '
      f'mesh; choose a multiple of {n} (batch sizes are global).'
    )


def to_global(tree: Any, mesh) -> Any:
  """Host-local numpy batch (this host's rows) -> global arrays sharded on 'data'.

  Every host passes its own slice of the global batch; the result has the
  global leading dimension. Works unchanged on one host.
  """
  sharding = data_sharded(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
  )
