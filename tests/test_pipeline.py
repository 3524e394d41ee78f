"""Tests of the step-indexed train pipeline and the padded eval pipeline.

A small in-memory `Source` (PNG bytes) replaces the configured dataset via
monkeypatching `sources.get_source`. Batches are compared exactly: against an
eager recomputation of each example from its (seed, step, slot), across a
resume, and across two simulated hosts; eval batches against a NumPy
reference (np.pad 'reflect' + canvas padding).
"""

import importlib.util
import io
import pathlib

import numpy as np
import pytest
from PIL import Image

from cac_jax.data import augment, pairs, pipeline, sources

REPO = pathlib.Path(__file__).resolve().parents[1]
MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def _make_source(rng, n, labeled, sizes=((24, 40), (40, 30), (33, 33))):
  images, labels = [], []
  for i in range(n):
    h, w = sizes[i % len(sizes)]
    images.append(_png(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)))
    lab = rng.integers(0, 4, (h, w)).astype(np.uint8)
    lab[0, 0] = 255
    labels.append(_png(lab))
  return sources.Source(
    ids=tuple(f'ex{i}' for i in range(n)),
    images=tuple(images),
    labels=tuple(labels) if labeled else None,
    from_files=False,
    num_classes=4,
    class_names=('a', 'b', 'c', 'd'),
    palette=np.zeros((4, 3), np.uint8),
  )


@pytest.fixture(scope='module')
def fake_sources():
  rng = np.random.default_rng(0)
  return {
    'labeled': _make_source(rng, 6, True),
    'unlabeled': _make_source(rng, 7, False),
    'val': _make_source(rng, 11, True, sizes=((20, 30), (35, 26), (17, 41))),
  }


@pytest.fixture
def config(fake_sources, monkeypatch):
  def get_source(data_config, split):
    del data_config
    return fake_sources[split]

  monkeypatch.setattr(sources, 'get_source', get_source)
  spec = importlib.util.spec_from_file_location('default_config', REPO / 'configs' / 'default.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.seed = 3
  cfg.data.crop_size = 16
  cfg.data.base_size = 24
  cfg.data.labeled_batch_size = 4
  cfg.data.unlabeled_batch_size = 4
  cfg.data.eval_batch_size = 4
  return cfg


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], dict):
      _assert_batches_equal(a[k], b[k])
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_batch_shapes_and_wiring(config, fake_sources):
  batches = _take(pipeline.train_iterator(config, process_index=0, process_count=1), 3)
  lab, unl = batches[0]['labeled'], batches[0]['unlabeled']
  assert lab['image'].shape == (4, 16, 16, 3) and lab['image'].dtype == np.float32
  assert lab['label'].shape == (4, 16, 16) and lab['label'].dtype == np.int32
  for v in (1, 2):
    assert unl[f'image{v}'].shape == (4, 16, 16, 3)
    assert unl[f'box{v}'].shape == (4, 4) and unl[f'box{v}'].dtype == np.int32
    assert unl[f'flip{v}'].shape == (4,) and unl[f'flip{v}'].dtype == np.bool_
  # Every example equals its eager recomputation from (seed, step, slot).
  data = config.data
  for step, batch in enumerate(batches):
    for j in range(4):
      idx = int(pipeline.example_index(config.seed, pipeline.LABELED_ORDER, step, j, 4, 6))
      src = fake_sources['labeled']
      ref = augment.labeled_example(
        sources.decode_image(src.images[idx], False),
        sources.decode_label(src.labels[idx], False),
        pipeline.example_seed(config.seed, pipeline.LABELED_AUG, step, j),
        crop_size=16,
        base_size=24,
        scale_range=data.labeled_scale_range,
      )
      np.testing.assert_array_equal(batch['labeled']['image'][j], ref['image'])
      np.testing.assert_array_equal(batch['labeled']['label'][j], ref['label'])
      idx = int(pipeline.example_index(config.seed, pipeline.UNLABELED_ORDER, step, j, 4, 7))
      ref = pairs.sample_pair(
        sources.decode_image(fake_sources['unlabeled'].images[idx], False),
        pipeline.example_seed(config.seed, pipeline.UNLABELED_AUG, step, j),
        crop_size=16,
        base_size=24,
        scale_range=data.unlabeled_scale_range,
        iou_range=data.iou_range,
      )
      for k in ('box1', 'box2', 'flip1', 'flip2'):
        np.testing.assert_array_equal(batch['unlabeled'][k][j], ref[k])
      # Normalisation of the same float32 crop in float32 (pipeline) vs float64
      # (here): |x| <= 2.7 after normalising, two rounded ops of relative
      # 2^-24 each -> <= ~4e-7 absolute; 1e-5 is 25x that and 1000x below a
      # real bug (a wrong channel mean or std moves values by >= 0.01).
      np.testing.assert_allclose(
        batch['unlabeled']['image2'][j], (ref['image2'].numpy() - MEAN) / STD, atol=1e-5
      )
  # Fresh augmentation: the same slot differs between steps.
  assert not np.array_equal(batches[0]['unlabeled']['image1'], batches[1]['unlabeled']['image1'])


def test_epochs_visit_every_example_once():
  n, batch, seed = 7, 3, 11
  order = [
    int(pipeline.example_index(seed, 1, step, j, batch, n))
    for step in range(7)
    for j in range(batch)
  ]  # 3 epochs
  epochs = [order[i * n : (i + 1) * n] for i in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(n))
  assert epochs[0] != epochs[1] != epochs[2]


def test_resume_yields_the_same_batches(config):
  full = _take(pipeline.train_iterator(config, process_index=0, process_count=1), 5)
  resumed = _take(
    pipeline.train_iterator(config, start_step=3, process_index=0, process_count=1), 2
  )
  _assert_batches_equal(full[3], resumed[0])
  _assert_batches_equal(full[4], resumed[1])


def test_two_hosts_make_the_global_batch(config):
  single = _take(pipeline.train_iterator(config, start_step=1, process_index=0, process_count=1), 2)
  hosts = [
    _take(pipeline.train_iterator(config, start_step=1, process_index=p, process_count=2), 2)
    for p in (0, 1)
  ]
  for step in range(2):
    joined = {
      part: {
        k: np.concatenate([hosts[0][step][part][k], hosts[1][step][part][k]])
        for k in single[step][part]
      }
      for part in single[step]
    }
    assert hosts[0][step]['labeled']['image'].shape[0] == 2
    _assert_batches_equal(single[step], joined)


def test_supervised_only_builds_no_unlabeled_stream(config, fake_sources, monkeypatch):
  def get_source(data_config, split):
    del data_config
    if split == 'unlabeled':
      raise AssertionError('the unlabeled split must not be read')
    return fake_sources[split]

  monkeypatch.setattr(sources, 'get_source', get_source)
  config.cac.supervised_only = True
  batch = next(pipeline.train_iterator(config, process_index=0, process_count=1))
  assert set(batch) == {'labeled'}


def test_bad_batch_split_raises(config):
  with pytest.raises(ValueError, match='labeled_batch_size=4 must be'):
    pipeline.train_iterator(config, process_index=0, process_count=3)
  config.data.crop_size = 20
  with pytest.raises(ValueError, match='multiple of the feature stride'):
    pipeline.train_iterator(config, process_index=0, process_count=1)


def _eval_reference(src, index):
  """The authors' protocol in float64: normalise, reflect-pad bottom/right to 8."""
  image = np.asarray(Image.open(io.BytesIO(src.images[index])), np.float64)
  label = np.asarray(Image.open(io.BytesIO(src.labels[index])), np.int64)
  h, w = label.shape
  image = np.pad((image - MEAN) / STD, ((0, -h % 8), (0, -w % 8), (0, 0)), mode='reflect')
  label = np.pad(label, ((0, -h % 8), (0, -w % 8)), constant_values=255)
  return image, label


@pytest.mark.parametrize('canvas', [0, 128])
@pytest.mark.parametrize('process_count,multiple', [(1, 1), (1, 2), (2, 2), (2, 4)])
def test_eval_covers_every_image_once_at_its_own_size(
  config, fake_sources, process_count, multiple, canvas
):
  """11 images of 3 sizes, global batch 4, each image at its own padded size.

  Sizes cycle (20, 30), (35, 26), (17, 41) -> padded (24, 32), (40, 32), (24, 48).
  canvas 0: each batch holds one padded size, groups of 4, 4 and 3 images, so
  batches 4, 4, 3 rounded up to `multiple`. canvas 128: all share one 64 x 64
  canvas (the padded sizes rounded up to 32), batches 4, 4, 3 in val order,
  each image at the top-left with its size in 'size' and blank beyond.
  """
  config.eval.window = 0  # the whole-image protocol (configs/default.py uses windows)
  config.eval.canvas_multiple = canvas
  src = fake_sources['val']
  want_batches = 3
  assert (
    pipeline.eval_num_batches(config, process_count=process_count, multiple=multiple)
    == want_batches
  )
  seen = []
  for p in range(process_count):
    batches = list(
      pipeline.eval_iterator(
        config, process_index=p, process_count=process_count, multiple=multiple
      )
    )
    assert len(batches) == want_batches  # the same on every host
    for batch in batches:
      assert batch['label'].dtype == np.int32 and batch['valid'].dtype == np.bool_
      assert ('size' in batch) == bool(canvas)
      if canvas:
        assert batch['image'].shape[1:3] == (64, 64)
      for i in np.flatnonzero(~batch['valid']):
        assert (batch['label'][i] == 255).all() and (batch['image'][i] == 0).all()
      for i in np.flatnonzero(batch['valid']):
        h, w = batch['size'][i] if canvas else batch['image'].shape[1:3]
        # Which image: the one whose reference matches (ids are not carried).
        matches = [
          g
          for g in range(11)
          if _eval_reference(src, g)[0].shape[:2] == (h, w)
          and np.array_equal(_eval_reference(src, g)[1], batch['label'][i, :h, :w])
        ]
        assert len(matches) == 1
        g = matches[0]
        seen.append(g)
        image, _ = _eval_reference(src, g)
        # float32 normalisation of 8-bit values (|x| < 3) against float64:
        # a few ulps of 3, i.e. ~1e-6; 1e-5 leaves 10x room and is far below
        # one grey level (1/255/0.225 ~ 0.017).
        np.testing.assert_allclose(batch['image'][i, :h, :w], image, atol=1e-5)
        assert (batch['image'][i, h:] == 0).all() and (batch['image'][i, :, w:] == 0).all()
        assert (batch['label'][i, h:] == 255).all() and (batch['label'][i, :, w:] == 255).all()
  assert sorted(seen) == list(range(11))


def _plan(sizes, *args):
  return pipeline.plan_batches(sizes, *args)


def test_eval_plan_groups_by_padded_size_and_pads_to_the_device_multiple():
  sizes = ((20, 30), (500, 375), (17, 31), (24, 32), (500, 375), (3000, 2000))
  plan = _plan(sizes, 8, 2)
  # (24, 32) holds images 0, 2, 3; (504, 376) holds 1, 4; the large one alone.
  assert plan == [((24, 32), [0, 2, 3, -1]), ((504, 376), [1, 4]), ((3000, 2000), [5, -1])]


def test_eval_plan_on_shared_canvases_bounds_the_shapes():
  sizes = ((20, 30), (500, 375), (17, 31), (130, 32), (500, 333), (100, 120))
  plan = _plan(sizes, 8, 2, 128)
  # Buckets of 128 px: (128, 128) holds 0, 2, 5; (256, 128) holds 3;
  # (512, 384) holds 1, 4. Each canvas is the smallest multiple of 32 that
  # holds its members' padded sizes (500 -> 504 -> 512, 375 -> 376 -> 384).
  assert plan == [((128, 128), [0, 2, 5, -1]), ((512, 384), [1, 4]), ((160, 32), [3, -1])]
  # VOC-like sizes (max side 500, the other side anywhere in [100, 500]):
  # at most 4 x 4 canvases, against one shape per distinct padded size.
  rng = np.random.default_rng()
  short = rng.integers(100, 501, 1449)
  voc = [(500, int(s)) if rng.random() < 0.3 else (int(s), 500) for s in short]
  assert len({shape for shape, _ in _plan(voc, 16, 8, 128)}) <= 8
  assert len({shape for shape, _ in _plan(voc, 16, 8)}) > 80


def test_unlabeled_stream_started_late_gives_the_same_batches(config):
  """Training builds the pairs only from unsup_start_step: the batches do not change."""
  full = _take(pipeline.train_iterator(config, process_index=0, process_count=1), 4)
  early = _take(
    pipeline.train_iterator(config, process_index=0, process_count=1, unlabeled=False), 2
  )
  late = _take(
    pipeline.train_iterator(config, start_step=2, process_index=0, process_count=1, unlabeled=True),
    2,
  )
  assert all(set(b) == {'labeled'} for b in early)
  for got, want in zip(early + late, full):
    for key in got['labeled']:
      np.testing.assert_array_equal(got['labeled'][key], want['labeled'][key])
  for got, want in zip(late, full[2:]):
    for key in want['unlabeled']:
      np.testing.assert_array_equal(got['unlabeled'][key], want['unlabeled'][key])
