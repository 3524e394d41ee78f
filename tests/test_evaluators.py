"""cac_jax.evaluators: config entries, the shared prediction, extra splits in a run.

The val images are checked against each image predicted alone; the extra
evaluator of a tiny run against `cac_jax.evaluate` (and `cac_jax.predict`)
run on its checkpoint, and the images it logs against the split's own masks.
"""

import functools
import io
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from cac_jax import config_lib, datasets, evaluate, evaluators, sharding, visualize
from cac_jax.data import pipeline
from cac_jax.models import build_model
from train_utils import read_scalars, tiny_config


def _random_variables(model):
  seed = int(np.random.default_rng().integers(2**31))
  return model.init(jax.random.key(seed), jnp.zeros((1, 64, 64, 3)), train=False)


def _confusion(label, pred, k):
  keep = label != 255
  return np.bincount(k * label[keep].astype(np.int64) + pred[keep], minlength=k * k).reshape(k, k)


@pytest.mark.parametrize('options', [{'eval.flip': True}, {'eval.scales': (0.75, 1.0)}])
def test_val_images_show_the_scored_prediction(options):
  """The images evaluator draws what the mIoU evaluator scores.

  Both share one Prediction. The prediction third of each panel must equal
  the labels of that image run alone at its own size with the same options
  (no canvas, no batch), drawn in the dataset palette; the canvas part
  beyond the image is not drawn. And the confusion matrix the mIoU
  evaluator's step computes on that first batch equals the bincount of
  those alone-predictions against the masks. Labels are compared exactly:
  the same network on the same pixels, where only a tie within float
  rounding (never seen at these sizes) could differ.
  """
  config = tiny_config(**{'eval.num_images_logged': 2, **options})
  k = config.data.num_classes
  model = build_model(config.model, num_classes=k)
  variables = _random_variables(model)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    scorer, drawer = evaluators.build(config, model, mesh)
    assert (scorer.kind, drawer.kind) == ('miou', 'images')
    assert scorer.prediction is drawer.prediction
    results = evaluators.run_all([drawer], variables)
    batch = next(drawer.batches(max_batches=1))
    scored = np.asarray(scorer.prediction.confusion(variables, sharding.to_global(batch, mesh)))
  (panels,) = results['val'].values()
  palette = datasets.palette(config.data)
  alone_fn = jax.jit(
    functools.partial(
      evaluate.predict_logits, model, flip=config.eval.flip, scales=config.eval.scales
    )
  )
  want_conf = np.zeros((k, k), np.int64)
  for i in range(len(batch['image'])):
    h, w = batch['size'][i] if 'size' in batch else batch['image'].shape[1:3]
    alone = alone_fn(variables, batch['image'][i : i + 1, :h, :w])
    labels = np.asarray(jnp.argmax(alone[0], -1))
    want_conf += _confusion(batch['label'][i, :h, :w], labels, k)
    if i < len(panels):
      assert panels[i].shape[0] == h
      np.testing.assert_array_equal(panels[i][:, -w:], visualize.colorize(labels, palette))
  assert len(panels) == 2
  np.testing.assert_array_equal(scored, want_conf)


# ----------------------------------------------------------------------------
# Config entries and their errors.
# ----------------------------------------------------------------------------


def _problems(extra):
  config = tiny_config(**{'eval.extra': extra})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config, num_devices=8)
  return str(e.value)


def test_unknown_kind_split_or_key_is_a_config_error_naming_the_allowed_values():
  message = _problems(
    {
      'boxes': {'kind': 'boxes'},
      'test': {'split': 'test'},
      'typo': {'flipp': True},
      'val': {},
      'bad': {'window': 12},
    }
  )
  assert "eval.extra.boxes.kind='boxes' is not one of miou, images" in message
  assert "eval.extra.test.split='test' is not one of labeled, unlabeled, val" in message
  assert 'eval.extra.typo: unknown key(s) flipp; an entry takes kind, split' in message
  assert "eval.extra.val: the prefix 'val' is taken" in message
  assert 'eval.extra.bad.window=12 must be 0' in message
  assert "kind='images'" not in message
  # A reference that does not load, and one that is not an Evaluator.
  message = _problems({'a': {'kind': 'no_such_module:X'}, 'b': {'kind': 'numpy:zeros'}})
  assert "eval.extra.a.kind='no_such_module:X' cannot be loaded" in message
  assert "eval.extra.b.kind='numpy:zeros' is not a subclass" in message
  # Valid entries pass; the schema check does not read their names as typos.
  config_lib.validate(
    tiny_config(**{'eval.extra': {'labeled': {'split': 'labeled'}}}), num_devices=8
  )


def test_entries_start_from_config_eval_and_override_it():
  config = tiny_config(
    **{
      'eval.flip': True,
      'eval.num_images_logged': 0,
      'eval.extra': {
        'labeled': {'split': 'labeled', 'scales': [0.75, 1.0]},
        'pics': {'kind': 'images', 'num_images_logged': 1, 'flip': False},
      },
    }
  )
  got = [
    (
      e.prefix,
      e.kind,
      e.split,
      evaluators.prediction_options(e.config.eval),
      e.config.eval.num_images_logged,
    )
    for e in evaluators.entries(config)
  ]
  assert got == [
    ('val', 'miou', 'val', dict(flip=True, scales=(1.0,), window=0), 0),
    ('labeled', 'miou', 'labeled', dict(flip=True, scales=(0.75, 1.0), window=0), 0),
    ('pics', 'images', 'val', dict(flip=False, scales=(1.0,), window=0), 1),
  ]
  assert all(not e.config.eval.extra for e in evaluators.entries(config))
  with pytest.raises(config_lib.ConfigError, match="no miou evaluator named 'pics'.*labeled, val"):
    evaluators.find(config, 'pics')
  with pytest.raises(config_lib.ConfigError, match="split='train' is not one of labeled"):
    evaluators.find(config, split='train')


def test_a_split_without_masks_fails_when_built(tmp_path):
  """The folder dataset's unlabeled split has no masks: a ConfigError naming it."""
  root = tmp_path / 'data'
  for sub in ('images', 'masks', 'splits'):
    (root / sub).mkdir(parents=True)
  for split, names in (('labeled', ['a']), ('unlabeled', ['b']), ('val', ['a'])):
    (root / 'splits' / f'{split}.txt').write_text('\n'.join(names) + '\n')
  for name in 'ab':
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / 'images' / f'{name}.png')
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / 'masks' / 'a.png')
  config = tiny_config(
    **{
      'data.name': 'folder',
      'data.root': str(root),
      'data.num_classes': 2,
      'eval.extra': {'pool': {'split': 'unlabeled'}},
    }
  )
  config_lib.validate(config, num_devices=8)
  model = build_model(config.model, num_classes=2)
  with pytest.raises(
    config_lib.ConfigError, match="evaluator 'pool': the unlabeled split of folder has no masks"
  ):
    evaluators.build(config, model, sharding.make_mesh())


def test_an_old_run_without_extras_loads_with_the_default_evaluator_alone():
  from cac_jax import run_dir, saved_run

  saved = tiny_config().to_dict()
  del saved['eval']['extra']
  config = saved_run._with_new_fields(ml_collections.ConfigDict(saved))
  assert config.eval.extra.to_dict() == {}
  assert [(e.prefix, e.kind) for e in evaluators.entries(config)] == [
    ('val', 'miou'),
    ('val', 'images'),
  ]
  # Resuming such a run with today's default config changes nothing.
  assert run_dir.config_differences(json.loads(json.dumps(saved)), tiny_config()) == ([], [])


class LabeledPixels(evaluators.Evaluator):
  """A new evaluation mode in a module of its own: the split's scored pixels."""

  def run(self, variables):
    del variables
    yield 'pixels', float(sum(np.sum(b['label'] != 255) for b in self.batches()))


def test_a_kind_named_by_module_and_class_runs_from_config_alone():
  config = tiny_config(
    **{
      'eval.num_images_logged': 0,
      'eval.extra': {'count': {'kind': 'test_evaluators:LabeledPixels', 'split': 'labeled'}},
    }
  )
  config_lib.validate(config, num_devices=8)
  model = build_model(config.model, num_classes=config.data.num_classes)
  mesh = sharding.make_mesh()
  built = evaluators.build(config, model, mesh, evaluators.entries(config)[1:])
  assert isinstance(built[0], LabeledPixels)
  from cac_jax.data import sources

  source = sources.get_source(config.data, 'labeled')
  want = sum(int(np.sum(np.asarray(Image.open(io.BytesIO(m))) != 255)) for m in source.labels)
  assert evaluators.run_all(built, None) == {'count': {'pixels': want}}


# ----------------------------------------------------------------------------
# A run with an extra evaluator.
# ----------------------------------------------------------------------------

EXTRA = {
  'labeled': {'split': 'labeled', 'flip': False},
  'labeled_images': {'kind': 'images', 'split': 'labeled', 'num_images_logged': 2},
}


@pytest.fixture(scope='module')
def extra_run(tmp_path_factory):
  """The tiny run's first 2 (supervised) steps, evaluating val with flip, and the
  labeled split. Its training steps are the tiny run's, compiled once."""
  from cac_jax import train

  workdir = str(tmp_path_factory.mktemp('extra_run'))
  config = tiny_config(**{'eval_every': 2, 'eval.flip': True, 'eval.extra': EXTRA})
  return workdir, config, train.train_and_evaluate(config, workdir, stop_after=2)


def test_extra_evaluator_logs_what_evaluate_measures_on_that_split(extra_run):
  workdir, config, final = extra_run
  scalars = read_scalars(workdir)
  names = datasets.class_names(config.data)
  for key in ['miou', 'pixel_acc'] + [f'iou/{n}' for n in names]:
    assert list(scalars[f'val/{key}']) == [2] and list(scalars[f'labeled/{key}']) == [2]
  assert not any(t.startswith('labeled_images/') for t in scalars)
  # The same checkpoint scored from the command-line library: by the entry's
  # name, and by split and options; TensorBoard holds float32.
  by_name, _, step, _ = evaluate.evaluate_run(workdir, evaluator='labeled')
  by_split, _, _, used = evaluate.evaluate_run(
    workdir, split='labeled', overrides={'eval.flip': False}
  )
  assert step == 2 and by_name == by_split and used.eval.flip is False
  for key, value in by_name.items():
    assert scalars[f'labeled/{key}'][2] == [np.float32(value)], key
  # The default evaluator alone makes the history and the returned scores.
  default, _, _, used = evaluate.evaluate_run(workdir)
  assert used.eval.flip is True and default['miou'] != by_name['miou']
  history = json.loads(open(os.path.join(workdir, 'val_history.json')).read())
  assert history == {'2': default['miou']} and final['miou'] == default['miou']
  assert final == {**default, 'best_miou': default['miou'], 'best_step': 2}


def test_extra_images_evaluator_draws_the_split_it_names(extra_run):
  workdir, config, _ = extra_run
  images = read_scalars(workdir, images=True)
  ((val,),) = images['val/examples'].values()
  ((drawn,),) = images['labeled_images/examples'].values()
  assert len(val) == 2 + 3 and len(drawn) == 2 + 2  # clu: width, height, PNGs
  batch = next(pipeline.eval_iterator(config, split='labeled', max_batches=1))
  palette = datasets.palette(config.data)
  for i, png in enumerate(drawn[2:]):
    panel = np.asarray(Image.open(io.BytesIO(bytes(png))).convert('RGB'))
    h, w = batch['size'][i]
    # input | gap 2 | ground truth | gap 2 | prediction: the labeled split's mask.
    np.testing.assert_array_equal(
      panel[:h, w + 2 : 2 * w + 2], visualize.colorize(batch['label'][i, :h, :w], palette)
    )


def test_predict_uses_the_runs_eval_options(extra_run, tmp_path):
  """predict writes the scored prediction: the run evaluates with flip, so the
  mask is the argmax of the mean of both views' softmax, computed here by hand."""
  from cac_jax import constants, predict, saved_run
  from cac_jax.data import embedded

  workdir, config, _ = extra_run
  image, _ = embedded.generate_example('val', 3, 64)
  image = image[:61, :50]
  Image.fromarray(image).save(tmp_path / 'x.png')
  assert predict.run(workdir, str(tmp_path / 'x.png'), str(tmp_path / 'out')) == 0
  got = np.asarray(Image.open(tmp_path / 'out' / 'x.png'))
  _, model, variables, _ = saved_run.load_run(workdir)
  x = np.pad(
    constants.normalize(image.astype(np.float32)), [(0, 3), (0, 6), (0, 0)], mode='reflect'
  )[None]
  probs = [
    jax.nn.softmax(model.apply(variables, v, train=False)['logits']) for v in (x, x[:, :, ::-1])
  ]
  both = np.asarray(probs[0] + probs[1][:, :, ::-1])[0, :61, :50]
  np.testing.assert_array_equal(got, np.argmax(both, -1))
  # Without flip the mask differs: the run's saved option is what was applied.
  assert (np.argmax(np.asarray(probs[0])[0, :61, :50], -1) != got).any()
