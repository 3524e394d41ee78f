"""The `Source` contract: which examples a split has, and how to decode them.

A `Source` is a plain, immutable list of example references (encoded bytes or
file paths) plus the class metadata. The input pipeline turns it into a
`tf.data.Dataset` with `decode_image` / `decode_label`; everything dataset
specific (directory layouts, split files, label maps) stays in the dataset
modules (`embedded`, `voc`, `cityscapes`, `folder`). `get_source` calls the
reader that the dataset table (`cac_jax/datasets.py`) names for
`data.name`, and the readers take their classes from that table
(`classes`), so this module imports no dataset module.

Split protocol, shared by all datasets (`split_ids`): the labeled ids are a
seeded random draw (`data.split_seed`) of `data.num_labeled` train ids, unless
`data.labeled_split_file` names the authors' split file; the unlabeled ids are
those of `data.unlabeled_split_file` if given, else the train ids that are not
labeled.
"""

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from cac_jax import config_lib, datasets, registry
from cac_jax.data import masks

SPLITS = ('labeled', 'unlabeled', 'val')


class DataError(config_lib.ConfigError):
  """Bad dataset input (a ValueError). `problems` lists every problem, one per entry.

  A ConfigError subclass so entry points report it as a user error, without a
  stack trace.
  """

  def __init__(self, problems: Sequence[str] | str):
    self.problems = [problems] if isinstance(problems, str) else list(problems)
    super().__init__(f'{len(self.problems)} data problem(s):\n  - ' + '\n  - '.join(self.problems))


# eq=False: the generated __eq__/__hash__ would compare/hash the NumPy fields,
# which raises; Sources are compared by identity.
@dataclasses.dataclass(frozen=True, eq=False)
class Source:
  """The examples of one split.

  Attributes:
    ids: example ids, in a fixed order (the pipeline indexes examples by
      position, so this order is part of the data stream's determinism).
    images: per id, encoded PNG/JPEG bytes or a file path.
    labels: per id, an encoded single-channel (gray or palette) PNG of class
      ids, or its path; None for unlabeled splits.
    from_files: True if `images`/`labels` hold file paths, False for bytes.
    num_classes: number of classes K; valid label values are [0, K) and 255.
    class_names: K names.
    palette: uint8 [K, 3] display colours.
    label_map: uint8 [256] lookup applied to raw decoded label values (e.g.
      Cityscapes id -> train id); None means identity.
  """

  ids: tuple[str, ...]
  images: tuple[bytes | str, ...]
  labels: tuple[bytes | str, ...] | None
  from_files: bool
  num_classes: int
  class_names: tuple[str, ...]
  palette: np.ndarray
  label_map: np.ndarray | None = None

  def __post_init__(self):
    n = len(self.ids)
    if len(self.images) != n or (self.labels is not None and len(self.labels) != n):
      raise ValueError(
        f'Source has {n} ids but {len(self.images)} images and '
        f'{None if self.labels is None else len(self.labels)} labels; '
        'they must be parallel tuples'
      )
    if len(self.class_names) != self.num_classes:
      raise ValueError(
        f'Source has num_classes={self.num_classes} but {len(self.class_names)} class names'
      )
    if self.palette.shape != (self.num_classes, 3) or self.palette.dtype != np.uint8:
      raise ValueError(
        f'palette must be uint8 [{self.num_classes}, 3], got '
        f'{self.palette.dtype} {self.palette.shape}'
      )
    if self.label_map is not None and (
      self.label_map.shape != (256,) or self.label_map.dtype != np.uint8
    ):
      raise ValueError(
        f'label_map must be uint8 [256], got {self.label_map.dtype} {self.label_map.shape}'
      )

  def __len__(self) -> int:
    return len(self.ids)


# ----------------------------------------------------------------------------
# Decoding (pure TF, usable eagerly and inside tf.data).
# ----------------------------------------------------------------------------


def decode_image(ref, from_files: bool) -> tf.Tensor:
  """Decodes a PNG/JPEG/BMP/GIF/WebP (bytes or file path) to RGB.

  The one image decoder of training, evaluation and prediction. Gray becomes
  RGB, alpha is dropped, 16-bit PNGs are scaled to 8 bits, and EXIF
  orientation is ignored (pixels as stored, as PIL's `Image.open` gives them
  to the authors' code). JPEGs use the accurate integer DCT, which gives
  PIL's pixels exactly; TensorFlow's default (the fast DCT) differs from them
  by up to ~13 grey levels.

  Returns:
    uint8 [H, W, 3].
  """
  data = tf.io.read_file(ref) if from_files else ref
  image = tf.cond(
    tf.io.is_jpeg(data),
    lambda: tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
    lambda: tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False),
  )
  image.set_shape([None, None, 3])
  return image


def decode_label(
  ref, from_files: bool, label_map=None, *, num_classes=None, name=None, image_shape=None
) -> tf.Tensor:
  """Decodes a class-id PNG mask (bytes or file path) with `masks.read_mask`.

  Gray PNGs (1-16 bit; gray+alpha too) hold the class id as the value; palette
  PNGs hold it as the palette index (e.g. VOC's SegmentationClass). RGB masks
  are rejected: colours are not class ids. `label_map` (uint8 [256]) is then
  applied to the raw values. With `num_classes`, values outside [0, K) and 255
  are an error; with `image_shape` ([H, W, ...] tensor), so is a size
  mismatch. Errors (tf.errors.InvalidArgumentError inside tf.data) name
  `name` (default: the path, or 'mask' for bytes).

  Returns:
    uint8 [H, W] class ids; 255 = ignore.
  """
  data = tf.io.read_file(ref) if from_files else ref
  if name is None:
    name = ref if from_files else tf.constant('mask')
  table = None if label_map is None else np.asarray(label_map, np.uint8)
  shape = (
    tf.constant([-1, -1], tf.int32) if image_shape is None else tf.cast(image_shape[:2], tf.int32)
  )

  def read(data, name, shape):
    # Scalars arrive as bytes (tf.data) or 0-d arrays (eager). PNG files end
    # with the IEND chunk's CRC, so NumPy's stripping of trailing NULs from
    # bytes arrays cannot cut one.
    data, name = (x.item() if isinstance(x, np.ndarray) else x for x in (data, name))
    if isinstance(name, bytes):
      name = name.decode('utf-8', 'replace')
    return masks.read_mask(
      data,
      str(name),
      label_map=table,
      num_classes=num_classes,
      image_shape=None if shape[0] < 0 else tuple(int(v) for v in shape),
    )

  label = tf.numpy_function(read, [data, name, shape], tf.uint8, stateful=False)
  label.set_shape([None, None])
  return label


# ----------------------------------------------------------------------------
# Splits.
# ----------------------------------------------------------------------------


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def _default_id(field: str) -> str:
  """A split-file field's id: its base name without an image extension."""
  name = os.path.basename(field)
  stem, ext = os.path.splitext(name)
  return stem if ext.lower() in IMAGE_EXTENSIONS else name


def read_split_file(path: str, id_from_path=None) -> list[str]:
  """Reads ids from a split file.

  Accepts plain id lines (`2007_000032`, taken verbatim, dots included) and
  the authors' format (`<image path> <label path>`, e.g.
  `/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`); the id
  is derived from the image path with `id_from_path` (default: the file name
  without its image extension, `.jpg`, `.jpeg` or `.png` in any case).

  Raises:
    DataError: missing or empty file.
  """
  if not os.path.isfile(path):
    raise DataError(f'split file {path} does not exist; fix the path in the config')
  id_from_path = id_from_path or _default_id
  ids = []
  with open(path) as f:
    for line in f:
      fields = line.split()
      if fields:
        ids.append(id_from_path(fields[0]))
  if not ids:
    raise DataError(f'split file {path} is empty; list one image per line')
  return ids


def check_unique(ids: Sequence[str], where: str) -> None:
  """Raises DataError naming every id that occurs more than once."""
  seen, dups = set(), []
  for i in ids:
    if i in seen and i not in dups:
      dups.append(i)
    seen.add(i)
  if dups:
    raise DataError(
      f'{where} lists duplicate ids {dups[:10]}'
      f'{" ..." if len(dups) > 10 else ""}; remove the repeated lines'
    )


def split_ids(data_config, train_ids: Sequence[str], split: str, id_from_path=None) -> list[str]:
  """The labeled or unlabeled ids of the train set (see module docstring).

  Args:
    data_config: the `config.data` ConfigDict.
    train_ids: all train ids, in a fixed order.
    split: 'labeled' or 'unlabeled'.
    id_from_path: maps an image path of a split-file line to its id.

  Returns:
    The ids, in the order of `train_ids` (draws) or of the split file.

  Raises:
    DataError: split files that are empty, name unknown ids, repeat ids or
      overlap; `num_labeled` out of range.
  """
  if split not in ('labeled', 'unlabeled'):
    raise ValueError(f'split must be labeled or unlabeled, got {split!r}')
  check_unique(train_ids, 'the train list')
  known = set(train_ids)

  def from_file(path):
    ids = read_split_file(path, id_from_path)
    check_unique(ids, f'split file {path}')
    missing = [i for i in ids if i not in known]
    if missing:
      raise DataError(
        f'split file {path} names {len(missing)} id(s) that are not in '
        f'the train set, e.g. {missing[:5]}; check data.root and the file'
      )
    return ids

  if data_config.labeled_split_file:
    labeled = from_file(data_config.labeled_split_file)
  else:
    n = int(data_config.num_labeled)
    if not 1 <= n <= len(train_ids):
      raise DataError(
        f'data.num_labeled={n} must be in [1, {len(train_ids)}] (the '
        'number of train images); use the train size for full supervision'
      )
    # Draws are indices into train_ids, kept in train order.
    rng = np.random.default_rng(int(data_config.split_seed))
    chosen = np.sort(rng.permutation(len(train_ids))[:n])
    labeled = [train_ids[i] for i in chosen]
  if split == 'labeled':
    return labeled
  if data_config.unlabeled_split_file:
    unlabeled = from_file(data_config.unlabeled_split_file)
    overlap = sorted(set(unlabeled) & set(labeled))
    if overlap:
      raise DataError(
        f'split file {data_config.unlabeled_split_file} shares '
        f'{len(overlap)} id(s) with the labeled split, e.g. {overlap[:5]}; '
        'unlabeled images must not be labeled ones'
      )
    return unlabeled
  labeled_set = set(labeled)
  return [i for i in train_ids if i not in labeled_set]


def classes(data_config) -> tuple[tuple[str, ...], np.ndarray]:
  """(class names, uint8 [K, 3] palette) of the configured dataset, from the table.

  Raises:
    DataError: `data.num_classes` or `data.class_names` do not fit the dataset.
  """
  dataset = _dataset(data_config)
  problems = dataset.class_problems(data_config)
  if problems:
    raise DataError(problems)
  return dataset.names_for(data_config), dataset.palette_for(int(data_config.num_classes))


def _dataset(data_config) -> datasets.Dataset:
  try:
    return datasets.get(data_config.name)
  except ValueError as e:
    raise DataError(str(e)) from None


def get_source(data_config, split: str) -> Source:
  """The `Source` of one split of the configured dataset.

  Args:
    data_config: `config.data` (schema: cac_jax/config_lib.py).
    split: 'labeled' | 'unlabeled' | 'val'.

  Raises:
    DataError: an unknown `data.name`, or the dataset's files or split files are
      missing or inconsistent.
  """
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  reader = registry.load(_dataset(data_config).source)
  # Sources are immutable and costly to list (TFDS reads, directory scans);
  # training asks for the val source at every evaluation, so memoise them.
  key = (reader, _config_key(data_config), split)
  if key not in _SOURCE_CACHE:
    _SOURCE_CACHE[key] = reader(data_config, split)
  return _SOURCE_CACHE[key]


_SOURCE_CACHE: dict = {}


def _config_key(data_config) -> str:
  as_dict = data_config.to_dict() if hasattr(data_config, 'to_dict') else vars(data_config)
  return json.dumps(as_dict, sort_keys=True, default=str)


def require_dir(path: str, what: str, fix: str) -> None:
  """Raises DataError if `path` is not a directory."""
  if not path or not os.path.isdir(path):
    raise DataError(f'{what} {path!r} is not a directory; {fix}')
