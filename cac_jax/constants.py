"""Facts the whole package shares: the ignore label, the feature stride, normalisation.

NumPy only, so that every layer (the TensorFlow input pipeline, the JAX model
and loss, the NumPy tools for prediction and drawing) reads the same values
without importing another layer. The class names and colours of each dataset
are in the dataset table, `cac_jax.datasets`.
"""

import numpy as np

# Label of pixels (and stride-8 cells) without a class: unlabelled regions of
# the masks, padding added by augmentation and evaluation.
IGNORE_LABEL = 255

# Stride of the maps the DC loss sees (the stride-4 decoder output, pooled
# 2x2): crops, overlap boxes, eval windows and eval padding are multiples of it.
FEATURE_STRIDE = 8

# torchvision's ImageNet statistics, on the [0, 1] scale, as the backbones'
# ImageNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The same on the [0, 255] scale images travel in, each product rounded once
# to float32 (what `tf.constant(IMAGENET_MEAN, tf.float32) * 255.0` gives).
PIXEL_MEAN = np.float32(255.0) * np.asarray(IMAGENET_MEAN, np.float32)
PIXEL_STD = np.float32(255.0) * np.asarray(IMAGENET_STD, np.float32)


def normalize(image):
  """ImageNet standardisation of a float32 image [..., 3] with values in [0, 255].

  Only `-` and `/` with float32 NumPy constants, so the one definition serves
  NumPy, JAX and TensorFlow tensors (in tf.data graphs too): the training
  pipeline and prediction cannot drift apart. The results agree to float32
  rounding (1 ulp): TensorFlow graphs and XLA may divide by multiplying with
  the reciprocal. Callers cast integer images to float32 first.
  """
  return (image - PIXEL_MEAN) / PIXEL_STD
