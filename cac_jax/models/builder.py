"""Builds the CAC network from ``config.model``.

The config fields (schema: ``cac_jax/config_lib.py``): backbone (a name in
the backbone table, ``cac_jax/backbones.py``), output_stride (one the
backbone supports there), projector (bool), proj_dim (int), dtype
('float32' | 'bfloat16').
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cac_jax import backbones, registry
from cac_jax.models.deeplabv3plus import DeepLabV3Plus

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' -> the jnp dtype (clear error otherwise)."""
  if name not in DTYPES:
    raise ValueError(f'config.model.dtype must be one of {sorted(DTYPES)}, got {name!r}.')
  return DTYPES[name]


def build_backbone(name: str, output_stride: int = 16, dtype: str = 'float32') -> nn.Module:
  """The backbone alone (what ``convert`` fills and ``init_from`` loads).

  Raises:
    ValueError: a backbone not in the table, or a stride it does not support
      (config validation reports both first, with the fix).
  """
  backbone = backbones.get(name)
  if output_stride not in backbone.output_strides:
    raise ValueError(
      f'config.model.output_stride={output_stride} is not supported by {name}; it '
      f'supports {backbone.output_strides}.'
    )
  make = registry.load(backbone.make)
  return make(output_stride=output_stride, dtype=compute_dtype(dtype))


def build_model(model_config, num_classes: int) -> DeepLabV3Plus:
  """DeepLabv3+ (+ classifier and projector) for ``config.model``.

  Args:
    model_config: ConfigDict (or any object) with the fields listed above.
    num_classes: K, the number of segmentation classes.

  Returns:
    An unbound :class:`DeepLabV3Plus`; see its ``__call__`` for the outputs.
  """
  if num_classes < 1:
    raise ValueError(f'num_classes must be positive, got {num_classes}.')
  proj_dim = int(model_config.proj_dim)
  if proj_dim < 1:
    raise ValueError(f'config.model.proj_dim must be positive, got {proj_dim}.')
  backbone = build_backbone(
    model_config.backbone, int(model_config.output_stride), model_config.dtype
  )
  return DeepLabV3Plus(
    backbone=backbone,
    num_classes=int(num_classes),
    output_stride=int(model_config.output_stride),
    projector=bool(model_config.projector),
    proj_dim=proj_dim,
    dtype=compute_dtype(model_config.dtype),
  )
