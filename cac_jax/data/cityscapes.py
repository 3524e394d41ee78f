"""Cityscapes (2,975 train / 500 val, 19 classes) from a manual dir.

Layout under `data.root` (as extracted from leftImg8bit_trainvaltest.zip and
gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com/downloads/):

  leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png
  gtFine/{train,val}/<city>/<id>_gtFine_labelIds.png        (always shipped)
  gtFine/{train,val}/<city>/<id>_gtFine_labelTrainIds.png   (if cityscapesscripts made them)

`<id>` is e.g. `aachen_000000_000019`. When every example of a split has a
`labelTrainIds` mask those are used as they are; otherwise the `labelIds` masks
are mapped to the 19 train ids with `LABEL_MAP` (all other ids -> 255). The
labeled split is a seeded draw of `data.num_labeled` (372 / 744 in the paper)
or the authors' split files (lines
`leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png
gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png`).
The 19 class names and colours are its entry in `cac_jax/datasets.py`.
"""

import glob
import os

import numpy as np

from cac_jax.constants import IGNORE_LABEL
from cac_jax.data import sources

# Cityscapes label id of each train id 0..18 (cityscapesscripts' labels.py).
TRAIN_ID_TO_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
LABEL_MAP = np.full(256, IGNORE_LABEL, np.uint8)
LABEL_MAP[list(TRAIN_ID_TO_ID)] = np.arange(len(TRAIN_ID_TO_ID), dtype=np.uint8)

_IMAGE_SUFFIX = '_leftImg8bit'


def image_id(path: str) -> str:
  """`.../aachen_000000_000019_leftImg8bit.png` -> `aachen_000000_000019`."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return stem[: -len(_IMAGE_SUFFIX)] if stem.endswith(_IMAGE_SUFFIX) else stem


def list_images(root: str, split: str) -> dict[str, str]:
  """id -> image path of 'train' or 'val', sorted by id."""
  folder = os.path.join(root, 'leftImg8bit', split)
  sources.require_dir(
    folder,
    'Cityscapes image directory',
    'set data.root to the directory holding leftImg8bit/ and gtFine/ '
    '(extracted from leftImg8bit_trainvaltest.zip and '
    'gtFine_trainvaltest.zip, cityscapes-dataset.com)',
  )
  paths = glob.glob(os.path.join(folder, '*', f'*{_IMAGE_SUFFIX}.png'))
  if not paths:
    raise sources.DataError(
      f'{folder} holds no <city>/*{_IMAGE_SUFFIX}.png images; '
      'check that leftImg8bit_trainvaltest.zip was fully extracted'
    )
  images = {image_id(p): p for p in paths}
  return dict(sorted(images.items()))


def _mask_paths(root, split, image_paths):
  """Per image its gtFine mask paths (labelTrainIds, labelIds)."""
  out = []
  for p in image_paths:
    city = os.path.basename(os.path.dirname(p))
    base = os.path.join(root, 'gtFine', split, city, image_id(p) + '_gtFine_')
    out.append((base + 'labelTrainIds.png', base + 'labelIds.png'))
  return out


def get_source(data_config, split: str) -> sources.Source:
  """A split ('labeled' | 'unlabeled' | 'val') as file paths."""
  names, palette = sources.classes(data_config)
  root = data_config.root
  sources.require_dir(
    root,
    'data.root',
    'set --config.data.root to the Cityscapes directory holding leftImg8bit/ and gtFine/',
  )
  folder = 'val' if split == 'val' else 'train'
  images = list_images(root, folder)
  ids = (
    list(images)
    if split == 'val'
    else sources.split_ids(data_config, list(images), split, id_from_path=image_id)
  )
  paths = [images[i] for i in ids]
  labels, label_map = None, None
  if split != 'unlabeled':
    masks = _mask_paths(root, folder, paths)
    if all(os.path.exists(t) for t, _ in masks):
      labels = tuple(t for t, _ in masks)
    else:
      # Missing labelIds files are left for validate_source to report.
      labels, label_map = tuple(i for _, i in masks), LABEL_MAP
  return sources.Source(
    ids=tuple(ids),
    images=tuple(paths),
    labels=labels,
    from_files=True,
    num_classes=len(names),
    class_names=names,
    palette=palette,
    label_map=label_map,
  )
