"""What the extension-point tables share: registration, and code named lazily.

Each extension point (backbones: `cac_jax.backbones`; datasets:
`cac_jax.datasets`) is one dict from a config name to an entry holding the
facts config validation needs and a reference to the code that builds it.
That reference is either the callable itself or a 'package.module:attr'
string imported on first use. The string form keeps a table free of the
heavy layers it points into (the dataset table names TensorFlow readers
without importing TensorFlow, the backbone table names flax modules without
importing flax), so validating a config costs neither.
"""

import importlib
from typing import Any, Callable


def register(table: dict, name: str, entry, *, replace: bool = False):
  """Adds `entry` under `name`; a second entry of a name is an error unless `replace`."""
  if name in table and not replace:
    raise ValueError(f'{name!r} is already registered; pass replace=True to override it')
  table[name] = entry
  return entry


def load(ref: str | Callable[..., Any]) -> Callable[..., Any]:
  """The callable a table entry names: itself, or 'package.module:attr' imported.

  Raises:
    ValueError: a string that is not of the 'module:attr' form.
  """
  if callable(ref):
    return ref
  module, sep, attr = str(ref).partition(':')
  if not sep or not module or not attr:
    raise ValueError(f'{ref!r} is not a callable or a "package.module:attr" reference')
  return getattr(importlib.import_module(module), attr)
