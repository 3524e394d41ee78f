"""The dataset table: every `data.name` and its classes, colours and reader.

The one list of datasets. Config validation (`config_lib`) reads the class
counts and where `data.root` must point; `data/sources.py` builds a split by
calling the entry's reader; prediction and drawing take the class names and
colours from here without opening the data or importing TensorFlow. Pure
Python and NumPy: readers are named as 'module:function' strings, imported
only when a split is built.

Adding a dataset: write its reader, `get_source(data_config, split) ->
sources.Source` (the `data/voc.py`, `data/cityscapes.py` pattern, taking its
classes from `sources.classes`), then add one `Dataset` entry below (or
`register` it from your own code).
"""

import dataclasses
from typing import Callable

import numpy as np

from cac_jax import registry


def voc_palette(num_classes: int = 256) -> np.ndarray:
  """The standard PASCAL VOC colour map: uint8 [num_classes, 3] (bits of the index
  spread over the high bits of R, G, B)."""
  palette = np.zeros((num_classes, 3), np.uint8)
  for i in range(num_classes):
    c, r, g, b = i, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= (c & 1) << shift
      g |= ((c >> 1) & 1) << shift
      b |= ((c >> 2) & 1) << shift
      c >>= 3
    palette[i] = (r, g, b)
  return palette


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One dataset (eq=False: the palette is an array).

  Attributes:
    name: the `data.name` value.
    source: `(data_config, split) -> sources.Source`, or its 'module:function'.
    num_classes: its K; None when `data.num_classes` sets it (a folder).
    class_names: its K names; None for `class_0`, `class_1`, ...
      (`data.class_names` overrides either).
    palette: uint8 [K, 3] colours; None for the VOC colour map of K classes.
    root_help: the README section that says where `data.root` points; None
      when the dataset needs no `data.root`.
  """

  name: str
  source: str | Callable
  num_classes: int | None = None
  class_names: tuple[str, ...] | None = None
  palette: np.ndarray | None = None
  root_help: str | None = None

  def __post_init__(self):
    k = self.num_classes
    if self.class_names is not None and len(self.class_names) != k:
      raise ValueError(
        f'dataset {self.name!r}: {len(self.class_names)} class names for num_classes={k}'
      )
    if self.palette is not None and (
      k is None or self.palette.shape != (k, 3) or self.palette.dtype != np.uint8
    ):
      raise ValueError(f'dataset {self.name!r}: palette must be uint8 [{k}, 3]')
    if self.palette is not None:
      self.palette.flags.writeable = False  # shared by every Source of the dataset

  def class_problems(self, data_config) -> list[str]:
    """What is wrong with `data.num_classes` and `data.class_names` for this dataset."""
    k = int(data_config.num_classes)
    if self.num_classes is not None and k != self.num_classes:
      return [
        f'data.num_classes={k} but the {self.name} dataset has {self.num_classes} '
        f'classes; set data.num_classes={self.num_classes}'
      ]
    names = self.names_for(data_config)
    if len(names) != k:
      return [
        f'data.num_classes={k} but there are {len(names)} class names {names}; make them agree'
      ]
    return []

  def names_for(self, data_config) -> tuple[str, ...]:
    """`data.class_names` if set, else the dataset's (or class_0 ... class_{K-1})."""
    return (
      tuple(data_config.class_names)
      or self.class_names
      or tuple(f'class_{i}' for i in range(int(data_config.num_classes)))
    )

  def palette_for(self, num_classes: int) -> np.ndarray:
    """uint8 [num_classes, 3]: the dataset's colours, or the VOC colour map."""
    return self.palette if self.palette is not None else voc_palette(num_classes)


DATASETS: dict[str, Dataset] = {}


def register(dataset: Dataset, *, replace: bool = False) -> Dataset:
  """Adds a dataset to the table (replace=True overrides one of the same name)."""
  return registry.register(DATASETS, dataset.name, dataset, replace=replace)


def names() -> tuple[str, ...]:
  """Every registered dataset name, in registration order."""
  return tuple(DATASETS)


def get(name: str) -> Dataset:
  """The entry of `name`.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  if name not in DATASETS:
    raise ValueError(f'data.name={name!r} is not one of {names()}')
  return DATASETS[name]


def class_names(data_config) -> tuple[str, ...]:
  """The class names of the configured dataset (no data read)."""
  return get(data_config.name).names_for(data_config)


def palette(data_config) -> np.ndarray:
  """uint8 [K, 3] class colours of the configured dataset (no data read).

  A name not in this table (e.g. a run trained where another dataset was
  registered) gets the VOC colour map: colours are cosmetic.
  """
  k = int(data_config.num_classes)
  dataset = DATASETS.get(data_config.name)
  colours = dataset.palette_for(k) if dataset is not None else voc_palette(k)
  return colours if colours.shape == (k, 3) else voc_palette(k)


_README_VOC_CITYSCAPES = 'Training on PASCAL VOC and Cityscapes'

register(
  Dataset(
    'embedded',
    'cac_jax.data.embedded:get_source',
    num_classes=6,
    class_names=('brick', 'grass', 'gravel', 'stripes', 'checker', 'dots'),
    palette=np.array(
      [
        [178, 34, 34],
        [34, 139, 34],
        [128, 128, 128],
        [255, 215, 0],
        [65, 105, 225],
        [238, 130, 238],
      ],
      np.uint8,
    ),
  )
)
register(
  Dataset(
    'voc',
    'cac_jax.data.voc:get_source',
    num_classes=21,
    class_names=(
      'background',
      'aeroplane',
      'bicycle',
      'bird',
      'boat',
      'bottle',
      'bus',
      'car',
      'cat',
      'chair',
      'cow',
      'diningtable',
      'dog',
      'horse',
      'motorbike',
      'person',
      'pottedplant',
      'sheep',
      'sofa',
      'train',
      'tvmonitor',
    ),
    palette=voc_palette(21),
    root_help=_README_VOC_CITYSCAPES,
  )
)
register(
  Dataset(
    'cityscapes',
    'cac_jax.data.cityscapes:get_source',
    num_classes=19,
    class_names=(
      'road',
      'sidewalk',
      'building',
      'wall',
      'fence',
      'pole',
      'traffic light',
      'traffic sign',
      'vegetation',
      'terrain',
      'sky',
      'person',
      'rider',
      'car',
      'truck',
      'bus',
      'train',
      'motorcycle',
      'bicycle',
    ),
    palette=np.array(
      [
        [128, 64, 128],
        [244, 35, 232],
        [70, 70, 70],
        [102, 102, 156],
        [190, 153, 153],
        [153, 153, 153],
        [250, 170, 30],
        [220, 220, 0],
        [107, 142, 35],
        [152, 251, 152],
        [70, 130, 180],
        [220, 20, 60],
        [255, 0, 0],
        [0, 0, 142],
        [0, 0, 70],
        [0, 60, 100],
        [0, 80, 100],
        [0, 0, 230],
        [119, 11, 32],
      ],
      np.uint8,
    ),
    root_help=_README_VOC_CITYSCAPES,
  )
)
register(Dataset('folder', 'cac_jax.data.folder:get_source', root_help='Your own data set'))
