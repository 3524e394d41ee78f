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

from cac_jax.data import augment
from cac_jax.data import pairs
from cac_jax.data import pipeline
from cac_jax.data import sources

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
      ids=tuple(f'ex{i}' for i in range(n)), images=tuple(images),
      labels=tuple(labels) if labeled else None, from_files=False,
      num_classes=4, class_names=('a', 'b', 'c', 'd'),
      palette=np.zeros((4, 3), np.uint8))


@pytest.fixture(scope='module')
def fake_sources():
  rng = np.random.default_rng(0)
  return {'labeled': _make_source(rng, 6, True),
          'unlabeled': _make_source(rng, 7, False),
          'val': _make_source(rng, 11, True,
                              sizes=((20, 30), (35, 26), (17, 41)))}


@pytest.fixture
def config(fake_sources, monkeypatch):
  def get_source(data_config, split):
    del data_config
    return fake_sources[split]
  monkeypatch.setattr(sources, 'get_source', get_source)
  spec = importlib.util.spec_from_file_location(
      'default_config', REPO / 'configs' / 'default.py')
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
  batches = _take(pipeline.train_iterator(config, process_index=0,
                                          process_count=1), 3)
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
          crop_size=16, base_size=24, scale_range=data.labeled_scale_range)
      np.testing.assert_array_equal(batch['labeled']['image'][j], ref['image'])
      np.testing.assert_array_equal(batch['labeled']['label'][j], ref['label'])
      idx = int(pipeline.example_index(config.seed, pipeline.UNLABELED_ORDER, step, j, 4, 7))
      ref = pairs.sample_pair(
          sources.decode_image(fake_sources['unlabeled'].images[idx], False),
          pipeline.example_seed(config.seed, pipeline.UNLABELED_AUG, step, j),
          crop_size=16,
          base_size=24, scale_range=data.unlabeled_scale_range,
          iou_range=data.iou_range)
      for k in ('box1', 'box2', 'flip1', 'flip2'):
        np.testing.assert_array_equal(batch['unlabeled'][k][j], ref[k])
      np.testing.assert_allclose(batch['unlabeled']['image2'][j],
                                 (ref['image2'].numpy() - MEAN) / STD,
                                 atol=1e-5)
  # Fresh augmentation: the same slot differs between steps.
  assert not np.array_equal(batches[0]['unlabeled']['image1'],
                            batches[1]['unlabeled']['image1'])


def test_epochs_visit_every_example_once():
  n, batch, seed = 7, 3, 11
  order = [int(pipeline.example_index(seed, 1, step, j, batch, n))
           for step in range(7) for j in range(batch)]  # 3 epochs
  epochs = [order[i * n:(i + 1) * n] for i in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(n))
  assert epochs[0] != epochs[1] != epochs[2]


def test_resume_yields_the_same_batches(config):
  full = _take(pipeline.train_iterator(config, process_index=0,
                                       process_count=1), 5)
  resumed = _take(pipeline.train_iterator(config, start_step=3,
                                          process_index=0, process_count=1), 2)
  _assert_batches_equal(full[3], resumed[0])
  _assert_batches_equal(full[4], resumed[1])


def test_two_hosts_make_the_global_batch(config):
  single = _take(pipeline.train_iterator(config, start_step=1,
                                         process_index=0, process_count=1), 2)
  hosts = [_take(pipeline.train_iterator(config, start_step=1, process_index=p,
                                         process_count=2), 2) for p in (0, 1)]
  for step in range(2):
    joined = {part: {k: np.concatenate([hosts[0][step][part][k],
                                        hosts[1][step][part][k]])
                     for k in single[step][part]}
              for part in single[step]}
    assert hosts[0][step]['labeled']['image'].shape[0] == 2
    _assert_batches_equal(single[step], joined)


def test_supervised_only_builds_no_unlabeled_stream(config, fake_sources,
                                                    monkeypatch):
  def get_source(data_config, split):
    del data_config
    if split == 'unlabeled':
      raise AssertionError('the unlabeled split must not be read')
    return fake_sources[split]
  monkeypatch.setattr(sources, 'get_source', get_source)
  config.cac.supervised_only = True
  batch = next(pipeline.train_iterator(config, process_index=0,
                                       process_count=1))
  assert set(batch) == {'labeled'}


def test_bad_batch_split_raises(config):
  with pytest.raises(ValueError, match='labeled_batch_size=4 must be'):
    pipeline.train_iterator(config, process_index=0, process_count=3)
  config.data.crop_size = 20
  with pytest.raises(ValueError, match='multiple of the feature stride'):
    pipeline.train_iterator(config, process_index=0, process_count=1)


def _eval_reference(src, index, canvas):
  image = np.asarray(Image.open(io.BytesIO(src.images[index])), np.float64)
  label = np.asarray(Image.open(io.BytesIO(src.labels[index])), np.int64)
  h, w = label.shape
  image = np.pad((image - MEAN) / STD,
                 ((0, -h % 8), (0, -w % 8), (0, 0)), mode='reflect')
  image = np.pad(image, ((0, canvas[0] - image.shape[0]),
                         (0, canvas[1] - image.shape[1]), (0, 0)))
  label = np.pad(label, ((0, canvas[0] - h), (0, canvas[1] - w)),
                 constant_values=255)
  return image, label


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_covers_every_image_once(config, fake_sources, process_count):
  src = fake_sources['val']  # 11 images, global batch 4 -> 3 batches
  canvas = (40, 48)  # max (35, 41) rounded up to 8
  assert pipeline.eval_num_batches(config) == 3
  seen = []
  for p in range(process_count):
    batches = list(pipeline.eval_iterator(config, process_index=p,
                                          process_count=process_count))
    assert len(batches) == 3
    for k, batch in enumerate(batches):
      b = 4 // process_count
      assert batch['image'].shape == (b,) + canvas + (3,)
      assert batch['label'].dtype == np.int32 and batch['valid'].dtype == np.bool_
      for i in range(b):
        g = k * 4 + p * b + i
        assert batch['valid'][i] == (g < 11)
        if g >= 11:
          assert (batch['label'][i] == 255).all()
          continue
        seen.append(g)
        image, label = _eval_reference(src, g, canvas)
        np.testing.assert_allclose(batch['image'][i], image, atol=1e-5)
        np.testing.assert_array_equal(batch['label'][i], label)
  assert sorted(seen) == list(range(11))
