"""A custom dataset as a folder of images, masks and split lists.

Layout under `data.root`:

  images/<id>.jpg | .jpeg | .png   every image (labeled, unlabeled, val)
  masks/<id>.png (or .PNG)         labeled and val images only: gray PNG of
                                   class ids, or a palette PNG whose palette
                                   index is the class id; 255 = ignore
  splits/labeled.txt               ids, one per line
  splits/unlabeled.txt             ids; optional if splits/train.txt exists
  splits/val.txt                   ids
  splits/train.txt                 optional: all train ids; then labeled.txt
                                   may be left out and `data.num_labeled` ids
                                   are drawn (seed `data.split_seed`)

`data.labeled_split_file` / `data.unlabeled_split_file` override the split
lists. `data.num_classes` and `data.class_names` (default `class_0`, ...)
describe the classes; colours are the VOC colour map.
"""

import os

from cac_jax.data import sources


def list_images(root: str) -> dict[str, str]:
  """id -> path of every file in root/images with an image extension."""
  folder = os.path.join(root, 'images')
  sources.require_dir(folder, 'image directory', 'put the images in <data.root>/images/')
  images, clashes = {}, []
  for name in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(name)
    if ext.lower() in sources.IMAGE_EXTENSIONS:
      if stem in images:
        clashes.append(f'{images[stem]} and {name}')
      images[stem] = os.path.join(folder, name)
  if clashes:
    raise sources.DataError([f'two images share the id {c}; rename or remove one' for c in clashes])
  return images


def list_masks(root: str) -> dict[str, str]:
  """id -> path of every file in root/masks whose extension is .png in any case."""
  folder = os.path.join(root, 'masks')
  if not os.path.isdir(folder):
    return {}
  return {
    os.path.splitext(name)[0]: os.path.join(folder, name)
    for name in sorted(os.listdir(folder))
    if os.path.splitext(name)[1].lower() == '.png'
  }


def _ids_of(root, split, data_config):
  """Ids of 'labeled' | 'unlabeled' | 'val' following the module docstring."""

  def list_path(name):
    return os.path.join(root, 'splits', f'{name}.txt')

  def read(path):
    ids = sources.read_split_file(path)
    sources.check_unique(ids, f'split file {path}')
    return ids

  if split == 'val':
    return read(list_path('val'))
  train_list = list_path('train')
  if os.path.isfile(train_list):
    # A train list enables the shared protocol: draws or split-file overrides.
    config = data_config.copy_and_resolve_references()
    with config.unlocked():
      for name, field in (('labeled', 'labeled_split_file'), ('unlabeled', 'unlabeled_split_file')):
        if not config[field] and os.path.isfile(list_path(name)):
          config[field] = list_path(name)
    return sources.split_ids(config, read(train_list), split)
  field = f'{split}_split_file'
  path = data_config[field] or list_path(split)
  if not os.path.isfile(path):
    raise sources.DataError(
      f'split list {path} does not exist; write it (one id per '
      f'line), or splits/train.txt to draw data.num_labeled ids'
    )
  ids = read(path)
  if split == 'unlabeled':
    other = data_config.labeled_split_file or list_path('labeled')
    overlap = sorted(set(ids) & set(read(other))) if os.path.isfile(other) else []
    if overlap:
      raise sources.DataError(
        f'{path} and {other} share {len(overlap)} id(s), e.g. '
        f'{overlap[:5]}; an image is either labeled or unlabeled'
      )
  return ids


def get_source(data_config, split: str) -> sources.Source:
  """A split ('labeled' | 'unlabeled' | 'val') as file paths."""
  root = data_config.root
  sources.require_dir(
    root, 'data.root', 'set --config.data.root to the folder holding images/, masks/ and splits/'
  )
  names, palette = sources.classes(data_config)
  images = list_images(root)
  ids = _ids_of(root, split, data_config)
  missing = [i for i in ids if i not in images]
  if missing:
    raise sources.DataError(
      f'the {split} split names {len(missing)} id(s) with no image '
      f'in {os.path.join(root, "images")}, e.g. {missing[:5]}; add '
      'the images or remove the ids'
    )
  found_masks = {} if split == 'unlabeled' else list_masks(root)
  return sources.Source(
    ids=tuple(ids),
    images=tuple(images[i] for i in ids),
    labels=None
    if split == 'unlabeled'
    else tuple(found_masks.get(i, os.path.join(root, 'masks', f'{i}.png')) for i in ids),
    from_files=True,
    num_classes=len(names),
    class_names=names,
    palette=palette,
  )
