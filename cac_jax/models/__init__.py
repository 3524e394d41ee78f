"""The CAC network: dilated backbones, DeepLabv3+ head, classifier, projector.

Importing this package needs neither TensorFlow nor torch; torchvision
checkpoints are read by :mod:`cac_jax.models.torch_pickle` and mapped by
:mod:`cac_jax.models.convert`. Which backbones exist, and what each supports,
is the backbone table, :mod:`cac_jax.backbones`.
"""

from cac_jax.models.builder import build_backbone, build_model
from cac_jax.models.deeplabv3plus import DeepLabV3Plus

__all__ = ['build_backbone', 'build_model', 'DeepLabV3Plus']
