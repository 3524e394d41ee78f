"""cac_jax.predict and cac_jax.saved_run on a trained tiny run.

One tiny run (4 steps) is trained per module; predictions are checked for
file format and sizes, against an independent forward pass, and the command
line for its exit status and report of bad files.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from cac_jax import checkpoint as ckpt_lib
from cac_jax import optim, predict, saved_run, sharding, train_state
from cac_jax.data import embedded
from cac_jax.models import build_model
from train_utils import REPO, tiny_config

NUM_CLASSES = tiny_config().data.num_classes
SIZES = {'odd': (77, 90), 'square': (64, 64)}  # 77 x 90: not a multiple of 8


@pytest.fixture(scope='module')
def run(tiny_run):
  return tiny_run  # conftest: trained once per test worker, shared


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """A folder with two valid images of different sizes and one corrupt file."""
  folder = tmp_path_factory.mktemp('images')
  big, _ = embedded.generate_example('val', 0, 96)
  Image.fromarray(big[:77, :90]).save(folder / 'odd.jpg', quality=95)
  square, _ = embedded.generate_example('val', 1, 64)
  Image.fromarray(square).save(folder / 'square.png')
  (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated, not a JPEG')
  return str(folder)


def _independent_mask(workdir, image_u8):
  """argmax of the model's logits, computed without cac_jax.predict/saved_run."""
  config = tiny_config()
  model = build_model(config.model, num_classes=config.data.num_classes)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  manager = ckpt_lib.make_manager(workdir, config.keep_checkpoints)
  # The run evaluates (and records an mIoU) only at step 4: the best step.
  state = ckpt_lib.restore(
    manager, train_state.abstract_state(model, tx, config, sharding.make_mesh()), 4
  )
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  mean = 255 * np.array([0.485, 0.456, 0.406])
  std = 255 * np.array([0.229, 0.224, 0.225])
  x = ((image_u8 - mean) / std).astype(np.float32)
  h, w = x.shape[:2]
  x = np.pad(x, [(0, (8 - h % 8) % 8), (0, (8 - w % 8) % 8), (0, 0)], mode='reflect')
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False)['logits'])(variables, x[None])
  return np.argmax(np.asarray(logits)[0, :h, :w], axis=-1)


def test_load_run_restores_best_checkpoint(run):
  workdir, _ = run
  config, model, variables, step = saved_run.load_run(workdir)
  assert step == 4  # the only checkpoint with an mIoU (step 2 has none)
  assert config.model.backbone == 'resnet_tiny'
  assert set(variables) == {'params', 'batch_stats'}
  _, _, _, latest = saved_run.load_run(workdir, which='latest')
  assert latest == 4
  _, _, _, two = saved_run.load_run(workdir, step=2)
  assert two == 2
  with pytest.raises(saved_run.RunError, match='available steps'):
    saved_run.load_run(workdir, step=3)


def test_load_run_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(saved_run.RunError, match='does not exist'):
    saved_run.load_run(str(tmp_path))
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(saved_run.RunError, match='no finished checkpoint'):
    saved_run.load_run(str(tmp_path))


def test_predict_writes_palette_masks_and_reports_bad_files(run, images, tmp_path, capsys):
  workdir, _ = run
  out = str(tmp_path / 'out')
  assert predict.run(workdir, images, out) == 0
  captured = capsys.readouterr()
  assert captured.out.strip().splitlines()[-1] == '2 predicted, 1 skipped'
  assert 'broken.jpg' in captured.err
  assert sorted(os.listdir(out)) == [
    'odd.png',
    'odd_overlay.jpg',
    'square.png',
    'square_overlay.jpg',
  ]
  palette = embedded.PALETTE
  for name, (h, w) in SIZES.items():
    mask = Image.open(os.path.join(out, f'{name}.png'))
    assert mask.mode == 'P' and mask.size == (w, h)
    values = np.asarray(mask)
    assert values.min() >= 0 and values.max() < NUM_CLASSES
    # The palette is the dataset's: class k is drawn in PALETTE[k].
    stored = np.asarray(mask.getpalette()[: 3 * NUM_CLASSES], np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(stored, palette)
    overlay = Image.open(os.path.join(out, f'{name}_overlay.jpg'))
    assert overlay.size == (2 * w + 4, h)  # image | gap | blend


def test_predicted_mask_equals_independent_argmax(run, images, tmp_path):
  workdir, _ = run
  out = str(tmp_path / 'out')
  predict.run(workdir, os.path.join(images, 'odd.jpg'), out)
  image = np.asarray(Image.open(os.path.join(images, 'odd.jpg')).convert('RGB'))
  expected = _independent_mask(workdir, image)
  got = np.asarray(Image.open(os.path.join(out, 'odd.png')))
  # Same program on the same CPU: the argmax is expected to agree everywhere.
  np.testing.assert_array_equal(got, expected)
  assert len(np.unique(expected)) > 1  # a constant mask would prove little


def test_nothing_readable_returns_1(run, tmp_path, capsys):
  workdir, _ = run
  (tmp_path / 'only').mkdir()
  (tmp_path / 'only' / 'x.png').write_bytes(b'garbage')
  (tmp_path / 'only' / 'tiny.png').write_bytes(b'')
  Image.fromarray(np.zeros((4, 20, 3), np.uint8)).save(tmp_path / 'only' / 'small.png')
  assert predict.run(workdir, str(tmp_path / 'only'), str(tmp_path / 'out')) == 1
  captured = capsys.readouterr()
  assert captured.out.strip().splitlines()[-1] == '0 predicted, 3 skipped'
  assert 'at least 8 pixels' in captured.err


def test_command_line(run, images, tmp_path):
  workdir, _ = run
  env = dict(
    os.environ,
    CUDA_VISIBLE_DEVICES='',
    TF_CPP_MIN_LOG_LEVEL='3',
    JAX_COMPILATION_CACHE_DIR=str(REPO / '.cache' / 'jax'),
  )
  cmd = [
    sys.executable,
    '-m',
    'cac_jax.predict',
    f'--workdir={workdir}',
    f'--images={images}',
    f'--out={tmp_path / "cli"}',
    '--which=latest',
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == '2 predicted, 1 skipped'
  assert 'skipped' in proc.stderr and 'broken.jpg' in proc.stderr
  assert (tmp_path / 'cli' / 'odd.png').exists()
  # A workdir without checkpoints: a message, no stack trace, status 2.
  bad = subprocess.run(
    cmd[:3] + [f'--workdir={tmp_path}'] + cmd[4:],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode == 2
  assert 'error:' in bad.stderr and 'Traceback' not in bad.stderr
