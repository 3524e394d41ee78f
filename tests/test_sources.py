"""VOC, Cityscapes and folder sources on tiny fixtures in the real on-disk formats,
and exact label decoding (gray, palette, 16-bit, low bit depth, label maps)."""

import io
import os
import zlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from cac_jax import datasets
from cac_jax.data import masks, sources, voc
from configs import default


def _image(array, palette=None):
  """PIL image: uint8 -> L (P with a palette), uint16 -> I;16, bool -> 1, HxWx3 -> RGB."""
  if palette is None:
    return Image.fromarray(array)
  image = Image.frombytes('P', array.shape[::-1], np.ascontiguousarray(array, np.uint8).tobytes())
  image.putpalette(np.asarray(palette, np.uint8).ravel().tolist())
  return image


def _save(path, array, palette=None, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _image(array, palette).save(path, **kwargs)


def _png_bytes(array, palette=None, **kwargs):
  buffer = io.BytesIO()
  _image(array, palette).save(buffer, format='PNG', **kwargs)
  return buffer.getvalue()


def _with_text_chunk(png: bytes) -> bytes:
  """Inserts a tEXt chunk right after IHDR, i.e. before PLTE (PIL never does)."""
  payload = b'Comment\x00moves PLTE away from its usual offset'
  body = b'tEXt' + payload
  chunk = len(payload).to_bytes(4, 'big') + body + zlib.crc32(body).to_bytes(4, 'big')
  return png[:33] + chunk + png[33:]


def _random_mask(rng, shape, num_classes):
  mask = rng.integers(0, num_classes, shape).astype(np.uint8)
  mask[rng.random(shape) < 0.1] = 255
  return mask


def _data_config(name, root, num_classes, **overrides):
  config = default.get_config().data
  config.name, config.root, config.num_classes = name, str(root), num_classes
  config.update(overrides)
  return config


# ----------------------------------------------------------------------------
# decode_label / decode_image on every mask encoding.
# ----------------------------------------------------------------------------


def test_decode_label_gray_palette_and_bit_depths():
  rng = np.random.default_rng(0)
  mask = _random_mask(rng, (9, 13), 21)
  np.testing.assert_array_equal(sources.decode_label(_png_bytes(mask), False).numpy(), mask)
  # Palette PNG: TF expands it to RGB; the palette index must come back.
  palette_png = _png_bytes(mask, datasets.voc_palette(256))
  np.testing.assert_array_equal(sources.decode_label(palette_png, False).numpy(), mask)
  # A scrambled palette whose unused entries repeat a used colour at higher
  # indices, tRNS/pHYs chunks, and a tEXt chunk before PLTE.
  palette = rng.integers(0, 256, (256, 3))
  palette[200:250] = palette[3]
  tricky = _with_text_chunk(_png_bytes(mask, palette, dpi=(72, 72), transparency=7))
  assert tricky[37:41] == b'tEXt'
  np.testing.assert_array_equal(sources.decode_label(tricky, False).numpy(), mask)
  # 16-bit gray and 1-bit gray keep the stored values (libpng rescales them).
  np.testing.assert_array_equal(
    sources.decode_label(_png_bytes(mask.astype(np.uint16)), False).numpy(), mask
  )
  bits = (mask % 2).astype(bool)
  one_bit = _png_bytes(bits)
  assert one_bit[24:26] == b'\x01\x00'  # bit depth 1, gray
  np.testing.assert_array_equal(sources.decode_label(one_bit, False).numpy(), bits.astype(np.uint8))
  # A 4-bit palette PNG (PIL packs small palettes when asked).
  small = mask % 16
  four_bit = _png_bytes(small, datasets.voc_palette(16), bits=4)
  assert four_bit[24:26] == b'\x04\x03'  # bit depth 4, palette
  np.testing.assert_array_equal(sources.decode_label(four_bit, False).numpy(), small)
  # Label map and tf.data graph mode give the same result.
  label_map = rng.integers(0, 256, 256).astype(np.uint8)
  ds = tf.data.Dataset.from_tensors(tricky).map(lambda b: sources.decode_label(b, False, label_map))
  np.testing.assert_array_equal(next(iter(ds)).numpy(), label_map[mask])


def test_decode_label_rejects_rgb_masks():
  rgb = np.zeros((4, 4, 3), np.uint8)
  with pytest.raises(masks.MaskError, match='RGB'):
    sources.decode_label(_png_bytes(rgb), False)


def test_decode_image_gray_rgba_and_16_bit():
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
  rgba = np.concatenate([rgb, rng.integers(0, 256, (7, 5, 1), dtype=np.uint8)], -1)
  np.testing.assert_array_equal(sources.decode_image(_png_bytes(rgba), False).numpy(), rgb)
  gray = rgb[..., 0]
  np.testing.assert_array_equal(
    sources.decode_image(_png_bytes(gray), False).numpy(), np.repeat(gray[..., None], 3, -1)
  )
  deep = rng.integers(0, 65536, (7, 5), dtype=np.uint16)
  got = sources.decode_image(_png_bytes(deep), False).numpy()
  # 16 -> 8 bits is v / 257 rounded either way: allow one step.
  assert np.abs(got[..., 0].astype(int) - deep / 257).max() <= 1
  assert got.shape == (7, 5, 3)


# ----------------------------------------------------------------------------
# VOC 2012 + SBD.
# ----------------------------------------------------------------------------

TRAIN = [f'2007_{i:06d}' for i in range(32, 40)]
VAL = ['2008_000001', '2008_000002']


@pytest.fixture
def voc_root(tmp_path):
  """VOCdevkit/VOC2012 with JPEGs, gray Aug masks, one palette-only val mask."""
  rng = np.random.default_rng(2)
  root = tmp_path / 'VOCdevkit' / 'VOC2012'
  masks = {}
  for i in TRAIN + VAL:
    shape = (int(rng.integers(10, 20)), int(rng.integers(10, 20)))
    _save(
      str(root / 'JPEGImages' / f'{i}.jpg'),
      rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
      quality=95,
    )
    masks[i] = _random_mask(rng, shape, 21)
    if i == VAL[1]:  # only in VOC's own palette-PNG folder
      _save(str(root / 'SegmentationClass' / f'{i}.png'), masks[i], datasets.voc_palette())
    else:
      _save(str(root / 'SegmentationClassAug' / f'{i}.png'), masks[i])
  (root / 'ImageSets' / 'Segmentation').mkdir(parents=True)
  (root / 'ImageSets' / 'Segmentation' / 'train_aug.txt').write_text('\n'.join(TRAIN) + '\n')
  # The authors' line format for val.
  (root / 'val.txt').write_text(
    ''.join(f'/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n' for i in VAL)
  )
  return tmp_path, root, masks


def test_voc_draws_and_labels(voc_root):
  parent, root, masks = voc_root
  config = _data_config('voc', parent, 21, num_labeled=3, split_seed=4)
  labeled = sources.get_source(config, 'labeled')
  unlabeled = sources.get_source(config, 'unlabeled')
  val = sources.get_source(config, 'val')
  assert len(labeled) == 3 and sorted(labeled.ids + unlabeled.ids) == TRAIN
  assert list(labeled.ids) == sorted(labeled.ids)  # train order
  assert unlabeled.labels is None and labeled.from_files
  assert val.ids == tuple(VAL) and val.labels[1].endswith(f'SegmentationClass/{VAL[1]}.png')
  assert labeled.class_names[15] == 'person'
  np.testing.assert_array_equal(
    labeled.palette[[0, 1, 15]], [[0, 0, 0], [128, 0, 0], [192, 128, 128]]
  )
  for source in (labeled, val):
    for i, image, label in zip(source.ids, source.images, source.labels):
      np.testing.assert_array_equal(sources.decode_label(label, True).numpy(), masks[i])
      decoded = sources.decode_image(image, True).numpy()
      reference = np.asarray(Image.open(image).convert('RGB'))
      assert decoded.shape == reference.shape
      # Both use libjpeg; IDCT variants may differ by a grey level or two.
      assert np.abs(decoded.astype(int) - reference).mean() < 2
  draws = {
    sources.get_source(_data_config('voc', parent, 21, num_labeled=3, split_seed=s), 'labeled').ids
    for s in range(6)
  }
  assert len(draws) > 1  # the seed selects the draw
  assert sources.get_source(config, 'labeled').ids == labeled.ids


def test_voc_authors_split_files(voc_root, tmp_path):
  parent, root, _ = voc_root
  labeled_file, unlabeled_file = tmp_path / 'l.txt', tmp_path / 'u.txt'
  labeled_file.write_text(
    ''.join(f'/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n' for i in (TRAIN[5], TRAIN[1]))
  )
  unlabeled_file.write_text(
    ''.join(f'/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n' for i in TRAIN[2:4])
  )
  config = _data_config('voc', root, 21, labeled_split_file=str(labeled_file))
  assert sources.get_source(config, 'labeled').ids == (TRAIN[5], TRAIN[1])
  unlabeled = sources.get_source(config, 'unlabeled')
  assert set(unlabeled.ids) == set(TRAIN) - {TRAIN[5], TRAIN[1]}
  config.unlabeled_split_file = str(unlabeled_file)
  assert sources.get_source(config, 'unlabeled').ids == tuple(TRAIN[2:4])


def test_voc_tfds_builder(voc_root, tmp_path):
  _, root, masks = voc_root
  builder = voc.VocAug(data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  for split, ids in (('train', TRAIN), ('val', VAL)):
    got = {
      ex['id'].decode(): ex['segmentation_mask'][..., 0]
      for ex in tfds.as_numpy(builder.as_dataset(split=split))
    }
    assert sorted(got) == sorted(ids)
    for i in ids:
      np.testing.assert_array_equal(got[i], masks[i])


# ----------------------------------------------------------------------------
# Cityscapes.
# ----------------------------------------------------------------------------


@pytest.fixture
def cityscapes_root(tmp_path):
  rng = np.random.default_rng(3)
  raw = {}
  for split, cities in (('train', ('aachen', 'bochum')), ('val', ('lindau',))):
    for city in cities:
      for k in range(3):
        i = f'{city}_{k:06d}_000019'
        _save(
          str(tmp_path / 'leftImg8bit' / split / city / f'{i}_leftImg8bit.png'),
          rng.integers(0, 256, (8, 16, 3), dtype=np.uint8),
        )
        raw[i] = rng.integers(0, 34, (8, 16)).astype(np.uint8)  # ids 0..33
        _save(str(tmp_path / 'gtFine' / split / city / f'{i}_gtFine_labelIds.png'), raw[i])
  return tmp_path, raw


# Independent statement of cityscapesscripts' id -> trainId table.
_TRAIN_ID = {
  7: 0,
  8: 1,
  11: 2,
  12: 3,
  13: 4,
  17: 5,
  19: 6,
  20: 7,
  21: 8,
  22: 9,
  23: 10,
  24: 11,
  25: 12,
  26: 13,
  27: 14,
  28: 15,
  31: 16,
  32: 17,
  33: 18,
}


def test_cityscapes_label_ids_are_mapped_to_train_ids(cityscapes_root):
  root, raw = cityscapes_root
  config = _data_config('cityscapes', root, 19, num_labeled=2)
  val = sources.get_source(config, 'val')
  assert val.ids == tuple(f'lindau_{k:06d}_000019' for k in range(3))
  labeled = sources.get_source(config, 'labeled')
  unlabeled = sources.get_source(config, 'unlabeled')
  assert len(labeled) == 2 and len(unlabeled) == 4
  assert not set(labeled.ids) & set(unlabeled.ids)
  for source in (val, labeled):
    assert source.label_map is not None
    for i, label in zip(source.ids, source.labels):
      want = np.vectorize(lambda v: _TRAIN_ID.get(int(v), 255))(raw[i]).astype(np.uint8)
      got = sources.decode_label(label, True, source.label_map).numpy()
      np.testing.assert_array_equal(got, want)
  assert val.class_names[0] == 'road' and val.class_names[-1] == 'bicycle'


def test_cityscapes_train_ids_and_authors_split_file(cityscapes_root, tmp_path):
  root, raw = cityscapes_root
  for path in (root / 'gtFine').rglob('*_labelIds.png'):
    train_ids = np.vectorize(lambda v: _TRAIN_ID.get(int(v), 255))(
      np.asarray(Image.open(path))
    ).astype(np.uint8)
    _save(str(path).replace('_labelIds', '_labelTrainIds'), train_ids)
  split = tmp_path / 'labeled.txt'
  split.write_text(
    'leftImg8bit/train/bochum/bochum_000001_000019_leftImg8bit.png '
    'gtFine/train/bochum/bochum_000001_000019_gtFine_labelTrainIds.png\n'
  )
  config = _data_config('cityscapes', root, 19, labeled_split_file=str(split))
  labeled = sources.get_source(config, 'labeled')
  assert labeled.ids == ('bochum_000001_000019',) and labeled.label_map is None
  assert labeled.labels[0].endswith('bochum_000001_000019_gtFine_labelTrainIds.png')
  got = sources.decode_label(labeled.labels[0], True).numpy()
  want = np.vectorize(lambda v: _TRAIN_ID.get(int(v), 255))(raw['bochum_000001_000019'])
  np.testing.assert_array_equal(got, want)
  assert len(sources.get_source(config, 'unlabeled')) == 5


# ----------------------------------------------------------------------------
# Custom folder.
# ----------------------------------------------------------------------------


@pytest.fixture
def folder_root(tmp_path):
  rng = np.random.default_rng(4)
  masks = {}
  for k in range(6):
    i = f'img{k}'
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    if k % 2:
      _save(str(tmp_path / 'images' / f'{i}.png'), image)
    else:
      _save(str(tmp_path / 'images' / f'{i}.jpg'), image)
    if k < 4:
      masks[i] = _random_mask(rng, (12, 10), 3)
      if k % 2:  # a palette mask with arbitrary colours for classes 0, 1, 2
        palette = np.zeros((256, 3), np.uint8)
        palette[:3] = [[10, 200, 30], [250, 0, 0], [1, 2, 3]]
        palette[255] = [255, 255, 255]
        _save(str(tmp_path / 'masks' / f'{i}.png'), masks[i], palette)
      else:
        _save(str(tmp_path / 'masks' / f'{i}.png'), masks[i])
  (tmp_path / 'splits').mkdir()
  (tmp_path / 'splits' / 'labeled.txt').write_text('img0\nimg1\n')
  (tmp_path / 'splits' / 'unlabeled.txt').write_text('img4\nimg5\n')
  (tmp_path / 'splits' / 'val.txt').write_text('img2\nimg3\n')
  return tmp_path, masks


def test_folder_splits_and_masks(folder_root):
  root, masks = folder_root
  config = _data_config('folder', root, 3, class_names=('sky', 'road', 'car'))
  labeled = sources.get_source(config, 'labeled')
  val = sources.get_source(config, 'val')
  unlabeled = sources.get_source(config, 'unlabeled')
  assert labeled.ids == ('img0', 'img1') and val.ids == ('img2', 'img3')
  assert unlabeled.ids == ('img4', 'img5') and unlabeled.labels is None
  assert unlabeled.images[0].endswith('img4.jpg') and labeled.class_names[2] == 'car'
  for source in (labeled, val):
    for i, label in zip(source.ids, source.labels):
      np.testing.assert_array_equal(sources.decode_label(label, True).numpy(), masks[i])
  # With a train list, labeled.txt may be dropped and ids drawn instead.
  os.remove(root / 'splits' / 'labeled.txt')
  os.remove(root / 'splits' / 'unlabeled.txt')
  (root / 'splits' / 'train.txt').write_text('img0\nimg1\nimg4\nimg5\n')
  config = _data_config('folder', root, 3, num_labeled=1)
  drawn = sources.get_source(config, 'labeled')
  rest = sources.get_source(config, 'unlabeled')
  assert len(drawn) == 1 and sorted(drawn.ids + rest.ids) == ['img0', 'img1', 'img4', 'img5']
  assert drawn.class_names == ('class_0', 'class_1', 'class_2')


def test_split_draw_matches_an_independent_reference():
  config = default.get_config().data
  ids = [f'x{i}' for i in range(50)]
  config.num_labeled, config.split_seed = 7, 11
  chosen = set(np.random.default_rng(11).permutation(50)[:7].tolist())
  assert sources.split_ids(config, ids, 'labeled') == [f'x{i}' for i in sorted(chosen)]
  assert sources.split_ids(config, ids, 'unlabeled') == [
    f'x{i}' for i in range(50) if i not in chosen
  ]
  config.num_labeled = 51
  with pytest.raises(sources.DataError, match='num_labeled=51'):
    sources.split_ids(config, ids, 'labeled')
