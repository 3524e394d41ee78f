"""The one decoder of label masks, shared by training, evaluation and validation.

NumPy and PIL only (no TensorFlow): the tf.data pipelines call it through
`tf.numpy_function` (`sources.decode_label`), the data validator directly.

A mask is a PNG whose pixel values are class ids:
  * gray (1, 2, 4, 8 or 16 bit; gray + alpha too): the stored value;
  * palette: the palette index (never the colour, so a palette whose unused
    entries repeat a colour, e.g. zero-filled ones, still decodes exactly).
RGB(A) masks are refused: colours are not class ids. Values above 255 are
refused too (255 = ignore). With `num_classes`, every value must be in
[0, num_classes) or 255 after the dataset's `label_map`.
"""

import io

import numpy as np
from PIL import Image

from cac_jax.constants import IGNORE_LABEL

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# PNG colour types: 0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA.
_GRAY, _PALETTE, _GRAY_ALPHA = 0, 3, 4
_MAX_REPORTED = 8


class MaskError(ValueError):
  """A mask that is not a valid class-id PNG; the message names it and the fix."""


def read_mask(
  data: bytes,
  name: str = 'mask',
  *,
  label_map=None,
  num_classes: int | None = None,
  image_shape=None,
) -> np.ndarray:
  """Decodes an encoded mask to class ids.

  Args:
    data: the PNG file's bytes.
    name: the file (or id) named in error messages.
    label_map: optional uint8 [256] lookup applied to the raw values.
    num_classes: if given, values must be in [0, num_classes) or 255.
    image_shape: if given, (height, width, ...) of the image the mask belongs to.

  Returns:
    uint8 [H, W].

  Raises:
    MaskError: not a PNG, an RGB mask, values out of range, wrong size.
  """
  data = bytes(data)
  if not data.startswith(_PNG_SIGNATURE) or len(data) < 26:
    raise MaskError(f'{name} is not a PNG file; masks must be PNG (lossy JPEG changes class ids)')
  bit_depth, color_type = data[24], data[25]
  if color_type not in (_GRAY, _PALETTE, _GRAY_ALPHA):
    raise MaskError(
      f'{name} is an RGB(A) PNG; colours are not class ids, save a gray '
      '(mode L) or palette (mode P) PNG of class ids'
    )
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode in ('LA', 'PA'):
        im = im.getchannel(0)
      values = np.asarray(im)
  except Exception as e:  # PIL raises several types for damaged files
    raise MaskError(
      f'{name} is truncated or corrupt ({type(e).__name__}: {e}); re-export it'
    ) from None
  if values.ndim != 2:
    # Pillow opens 16-bit gray+alpha PNGs as 8-bit RGBA.
    raise MaskError(
      f'{name} decodes to {values.shape[-1]} channels (a {bit_depth}-bit '
      'gray+alpha PNG?); save a single-channel gray (mode L) or palette '
      '(mode P) PNG of class ids'
    )
  if values.dtype == bool:
    values = values.astype(np.uint8)
  elif color_type != _PALETTE and bit_depth < 8:
    # PIL scales 2- and 4-bit gray to 0..255; the stored value is the class id.
    values = values // (255 // (2**bit_depth - 1))
  values = values.astype(np.int64)
  if values.size and values.max() > IGNORE_LABEL:
    raise MaskError(
      f'{name} holds values above 255 (e.g. {int(values.max())}); class '
      'ids must fit in 8 bits with 255 = ignore'
    )
  mask = values.astype(np.uint8)
  if label_map is not None:
    mask = np.asarray(label_map, np.uint8)[mask]
  if image_shape is not None and tuple(mask.shape) != tuple(image_shape[:2]):
    raise MaskError(
      f'{name} is {mask.shape[1]}x{mask.shape[0]} but its image is '
      f'{image_shape[1]}x{image_shape[0]} (width x height); masks must '
      'match their images'
    )
  if num_classes is not None:
    used = np.unique(mask)
    bad = [int(v) for v in used if v >= num_classes and v != IGNORE_LABEL]
    if bad:
      raise MaskError(
        f'{name} holds values {bad[:_MAX_REPORTED]} outside '
        f'[0, {num_classes}) and 255 (ignore); fix the mask or '
        'data.num_classes'
      )
  return mask
