"""Builds the CAC network from ``config.model``.

The config fields (see ``configs/default.py``): backbone ('resnet50' |
'resnet101' | 'mobilenet_v2' | 'resnet_tiny'), output_stride (8 | 16),
projector (bool), proj_dim (int), dtype ('float32' | 'bfloat16').
"""
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from cac_jax.models import mobilenet_v2, resnet
from cac_jax.models.deeplabv3plus import DeepLabV3Plus

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    'resnet50': resnet.resnet50,
    'resnet101': resnet.resnet101,
    'resnet_tiny': resnet.resnet_tiny,
    'mobilenet_v2': mobilenet_v2.mobilenet_v2,
}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' -> the jnp dtype (clear error otherwise)."""
  if name not in DTYPES:
    raise ValueError(
        f'config.model.dtype must be one of {sorted(DTYPES)}, got {name!r}.')
  return DTYPES[name]


def build_backbone(name: str, output_stride: int = 16,
                   dtype: str = 'float32') -> nn.Module:
  """The backbone alone (what ``convert`` fills and ``init_from`` loads)."""
  if name not in BACKBONES:
    raise ValueError(
        f'unknown backbone {name!r}; config.model.backbone must be one of '
        f'{sorted(BACKBONES)}.')
  if output_stride not in (8, 16):
    raise ValueError(
        f'config.model.output_stride must be 8 or 16, got {output_stride}.')
  return BACKBONES[name](output_stride=output_stride, dtype=compute_dtype(dtype))


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
  backbone = build_backbone(model_config.backbone, int(model_config.output_stride),
                            model_config.dtype)
  return DeepLabV3Plus(
      backbone=backbone,
      num_classes=int(num_classes),
      output_stride=int(model_config.output_stride),
      projector=bool(model_config.projector),
      proj_dim=proj_dim,
      dtype=compute_dtype(model_config.dtype))
