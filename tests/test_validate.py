"""validate.py: every kind of bad input gives a DataError naming the file and the fix,
and all problems of a dataset are reported together."""

import io

import numpy as np
import pytest
from PIL import Image

from cac_jax.data import sources, validate
from cac_jax.data.sources import DataError
from configs import default
from train_utils import write_image


@pytest.fixture
def dataset(tmp_path):
  """A valid folder dataset: 3 classes, labeled a,b; unlabeled c,d; val e,f."""
  rng = np.random.default_rng(0)
  for i in 'abcdef':
    write_image(tmp_path / 'images' / f'{i}.png', rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    if i not in 'cd':
      mask = rng.integers(0, 3, (10, 12)).astype(np.uint8)
      mask[0, 0] = 255
      write_image(tmp_path / 'masks' / f'{i}.png', mask)
  (tmp_path / 'splits').mkdir()
  for name, ids in (('labeled', 'ab'), ('unlabeled', 'cd'), ('val', 'ef')):
    (tmp_path / 'splits' / f'{name}.txt').write_text('\n'.join(ids) + '\n')
  config = default.get_config().data
  config.name, config.root, config.num_classes = 'folder', str(tmp_path), 3
  return tmp_path, config


def _problems(config, check_pixels=True):
  with pytest.raises(DataError) as info:
    validate.validate_dataset(config, check_pixels=check_pixels)
  return info.value.problems


def _one(problems, *needles):
  """The single problem message containing every needle."""
  found = [p for p in problems if all(n in p for n in needles)]
  assert len(found) == 1, (needles, problems)
  return found[0]


def test_valid_dataset_passes(dataset):
  _, config = dataset
  built = validate.validate_dataset(config)
  assert [len(built[s]) for s in ('labeled', 'unlabeled', 'val')] == [2, 2, 2]


def test_missing_manual_directory(tmp_path):
  config = default.get_config().data
  config.name, config.root, config.num_classes = 'voc', str(tmp_path / 'nope'), 21
  problems = _problems(config)
  assert len(problems) == 1  # reported once, not once per split
  assert str(tmp_path / 'nope') in problems[0] and 'JPEGImages' in problems[0]


def test_image_without_mask(dataset):
  root, config = dataset
  (root / 'masks' / 'b.png').unlink()
  message = _one(_problems(config, check_pixels=False), 'no mask')
  assert str(root / 'masks' / 'b.png') in message and 'unlabeled' in message


def test_truncated_empty_and_unreadable_files(dataset):
  root, config = dataset
  data = (root / 'images' / 'a.png').read_bytes()
  (root / 'images' / 'a.png').write_bytes(data[: len(data) // 2])
  (root / 'images' / 'e.png').write_bytes(b'')
  (root / 'masks' / 'f.png').write_bytes(b'not an image at all')
  problems = _problems(config)
  assert 'truncated' in _one(problems, str(root / 'images' / 'a.png'))
  assert 'empty' in _one(problems, str(root / 'images' / 'e.png'))
  assert 'not a readable image' in _one(problems, str(root / 'masks' / 'f.png'))
  assert len(problems) == 3  # all reported together
  # Header-only checks miss truncation but still catch empty/garbage files.
  assert len(_problems(config, check_pixels=False)) == 2


def test_size_mismatch(dataset):
  root, config = dataset
  write_image(root / 'masks' / 'e.png', np.zeros((10, 11), np.uint8))
  message = _one(_problems(config, check_pixels=False), str(root / 'masks' / 'e.png'))
  assert '11x10' in message and '12x10' in message


def test_mask_values_out_of_range(dataset):
  root, config = dataset
  mask = np.zeros((10, 12), np.uint8)
  mask[3, 4], mask[5, 6] = 7, 254
  write_image(root / 'masks' / 'a.png', mask)
  message = _one(_problems(config), str(root / 'masks' / 'a.png'))
  assert '[7, 254]' in message and 'num_classes' in message
  assert validate.validate_dataset(config, check_pixels=False)  # values need pixels


def test_colour_masks_refused_palette_masks_read_by_index(dataset):
  root, config = dataset
  write_image(root / 'masks' / 'a.png', np.zeros((10, 12, 3), np.uint8))
  palette = np.zeros((256, 3), np.uint8)
  palette[1], palette[2] = (200, 0, 0), (0, 0, 0)  # class 2 looks like class 0
  index = np.zeros((10, 12), np.uint8)
  index[:, 6:] = 2
  write_image(root / 'masks' / 'e.png', index, palette)
  problems = _problems(config)
  assert 'mode RGB' in _one(problems, str(root / 'masks' / 'a.png'))
  # Palette masks are read by index, so two indices with one colour are fine.
  assert not [p for p in problems if 'e.png' in p], problems


def test_split_file_problems(dataset):
  root, config = dataset
  (root / 'splits' / 'val.txt').write_text('\n\n')
  message = _one(_problems(config), 'val.txt')
  assert 'empty' in message
  (root / 'splits' / 'val.txt').write_text('e\nghost\n')
  message = _one(_problems(config), 'ghost')
  assert 'no image' in message
  (root / 'splits' / 'val.txt').write_text('e\nf\ne\n')
  message = _one(_problems(config), 'duplicate')
  assert "['e']" in message and 'val.txt' in message


def test_labeled_unlabeled_overlap(dataset):
  root, config = dataset
  (root / 'splits' / 'unlabeled.txt').write_text('c\nb\n')
  message = _one(_problems(config), 'share')
  assert "['b']" in message and 'unlabeled.txt' in message


def test_validate_source_on_bytes_and_label_map():
  png = io.BytesIO()
  Image.fromarray(np.array([[7, 8], [0, 33]], np.uint8)).save(png, format='PNG')
  jpeg = io.BytesIO()
  Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(jpeg, format='JPEG')
  label_map = np.full(256, 255, np.uint8)
  label_map[7], label_map[8] = 0, 1
  source = sources.Source(
    ids=('x', 'x'),
    images=(jpeg.getvalue(), b''),
    labels=(png.getvalue(), png.getvalue()),
    from_files=False,
    num_classes=2,
    class_names=('a', 'b'),
    palette=np.zeros((2, 3), np.uint8),
    label_map=label_map,
  )
  problems = validate.source_problems(source)
  assert _one(problems, 'duplicate ids')
  assert _one(problems, 'image of id x', 'empty')
  assert len(problems) == 2  # with the map, raw ids 0 and 33 are ignore: valid
  unmapped = sources.Source(
    ids=('y',),
    images=(jpeg.getvalue(),),
    labels=(png.getvalue(),),
    from_files=False,
    num_classes=2,
    class_names=('a', 'b'),
    palette=np.zeros((2, 3), np.uint8),
  )
  with pytest.raises(DataError, match=r'\[7, 8, 33\]'):
    validate.validate_source(unmapped)
