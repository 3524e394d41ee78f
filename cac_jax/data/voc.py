"""PASCAL VOC 2012 augmented with SBD (10,582 train / 1,449 val), from a manual dir.

`data.root` is the `VOC2012` directory (or a parent holding `VOC2012/` or
`VOCdevkit/VOC2012/`); see `MANUAL_DOWNLOAD_INSTRUCTIONS`. Masks come from
`SegmentationClassAug/<id>.png` (gray PNGs of class ids); ids missing there
fall back to VOC's own `SegmentationClass/<id>.png` (palette PNGs whose palette
index is the class id, which `sources.decode_label` decodes correctly).

Split lists (first found wins): `ImageSets/SegmentationAug/train_aug.txt`,
`ImageSets/Segmentation/train_aug.txt` or `train_aug.txt`, and
`ImageSets/Segmentation/val.txt` or `val.txt`; lines are ids (`2007_000032`)
or the authors' `/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`.
The labeled split is a seeded draw of `data.num_labeled` (662 / 1,323 / 2,645
in the paper) or the authors' split files.

`get_source` reads the files directly (random access for tf.data); the TFDS
builder `VocAug` wraps the same file lists for users who want `tfds.load`.
The 21 class names and the VOC colour map are its entry in `cac_jax/datasets.py`.
"""

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from cac_jax.data import sources

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
1. VOC 2012: download VOCtrainval_11-May-2012.tar from
   http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and extract it; use
   VOCdevkit/VOC2012 as data.root (it holds JPEGImages/ and ImageSets/).
2. SBD-augmented masks: download SegmentationClassAug.zip (the gray class-id
   PNGs of the 10,582 + 1,449 images, as used by DeepLab and the CAC authors;
   linked from the README of github.com/dvlab-research/Context-Aware-Consistency)
   and extract it to data.root/SegmentationClassAug/.
3. The train_aug.txt list (10,582 ids) from the same place, into
   data.root/ImageSets/Segmentation/ (or data.root itself; the authors'
   `/JPEGImages/x.jpg /SegmentationClassAug/x.png` lines are accepted).
Optional: the authors' labeled/unlabeled split files, passed as
data.labeled_split_file / data.unlabeled_split_file.
"""

_TRAIN_LISTS = (
  'ImageSets/SegmentationAug/train_aug.txt',
  'ImageSets/Segmentation/train_aug.txt',
  'train_aug.txt',
)
_VAL_LISTS = ('ImageSets/Segmentation/val.txt', 'val.txt')


def find_root(root: str) -> str:
  """The directory holding JPEGImages/ (root, root/VOC2012 or root/VOCdevkit/VOC2012)."""
  sources.require_dir(
    root,
    'data.root',
    'set --config.data.root to the extracted '
    'VOCdevkit/VOC2012 directory:\n' + MANUAL_DOWNLOAD_INSTRUCTIONS,
  )
  for candidate in (
    root,
    os.path.join(root, 'VOC2012'),
    os.path.join(root, 'VOCdevkit', 'VOC2012'),
  ):
    if os.path.isdir(os.path.join(candidate, 'JPEGImages')):
      return candidate
  raise sources.DataError(
    f'data.root {root!r} has no JPEGImages/ directory (nor its '
    'VOC2012/ or VOCdevkit/VOC2012/); point it at the extracted '
    'VOC2012 directory:\n' + MANUAL_DOWNLOAD_INSTRUCTIONS
  )


def _list_file(root: str, candidates) -> str:
  for name in candidates:
    path = os.path.join(root, name)
    if os.path.isfile(path):
      return path
  raise sources.DataError(
    f'none of {[os.path.join(root, c) for c in candidates]} exists; '
    'add the split list (see MANUAL_DOWNLOAD_INSTRUCTIONS in '
    'cac_jax/data/voc.py)'
  )


def split_list(root: str, split: str) -> list[str]:
  """Ids of 'train' (train_aug) or 'val', in file order, checked for duplicates."""
  path = _list_file(root, _TRAIN_LISTS if split == 'train' else _VAL_LISTS)
  ids = sources.read_split_file(path)
  sources.check_unique(ids, f'split list {path}')
  return ids


def mask_path(root: str, image_id: str) -> str:
  """SegmentationClassAug/<id>.png, else SegmentationClass/<id>.png if only it exists."""
  aug = os.path.join(root, 'SegmentationClassAug', f'{image_id}.png')
  plain = os.path.join(root, 'SegmentationClass', f'{image_id}.png')
  return plain if not os.path.exists(aug) and os.path.exists(plain) else aug


def get_source(data_config, split: str) -> sources.Source:
  """A split ('labeled' | 'unlabeled' | 'val') as file paths."""
  names, palette = sources.classes(data_config)
  root = find_root(data_config.root)
  if split == 'val':
    ids = split_list(root, 'val')
  else:
    ids = sources.split_ids(data_config, split_list(root, 'train'), split)
  return sources.Source(
    ids=tuple(ids),
    images=tuple(os.path.join(root, 'JPEGImages', f'{i}.jpg') for i in ids),
    labels=None if split == 'unlabeled' else tuple(mask_path(root, i) for i in ids),
    from_files=True,
    num_classes=len(names),
    class_names=names,
    palette=palette,
  )


class VocAug(tfds.core.GeneratorBasedBuilder):
  """VOC 2012 + SBD masks ('train' = train_aug, 'val'), from the manual dir."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  # See CacTextures.code_path: TFDS 4.9.10 needs importlib_resources otherwise.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'id': tfds.features.Text(),
          'image': tfds.features.Image(shape=(None, None, 3)),
          'segmentation_mask': tfds.features.Image(shape=(None, None, 1)),
        }
      ),
      supervised_keys=('image', 'segmentation_mask'),
      homepage='http://host.robots.ox.ac.uk/pascal/VOC/voc2012/',
    )

  def _split_generators(self, dl_manager):
    root = find_root(os.fspath(dl_manager.manual_dir))
    return {s: self._generate_examples(root, split_list(root, s)) for s in ('train', 'val')}

  def _generate_examples(self, root, ids):
    for i in ids:
      # PIL keeps palette indices (the class ids) where TF would expand to RGB.
      with Image.open(mask_path(root, i)) as m:
        mask = np.asarray(m, dtype=np.uint8)
      yield (
        i,
        {
          'id': i,
          'image': os.path.join(root, 'JPEGImages', f'{i}.jpg'),
          'segmentation_mask': mask[..., None],
        },
      )
