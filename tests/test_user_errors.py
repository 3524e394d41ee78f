"""Bad inputs and faults, as a new user meets them: each ends in one clear error.

Table-driven where the cases share a shape. Every error names the file or the
config key and the fix; user errors are ConfigError/DataError (exit 2 on the
command line), faults exit 1; nothing already written is lost. The command
line mapping itself (exit code, one `error:` line, short stderr) is checked
in subprocesses for a few representative cases at the end.
"""

import errno
import json
import os
import re
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from PIL import Image

from cac_jax import checkpoint as ckpt_lib
from cac_jax import config_lib, paths, predict, run_dir, saved_run, train
from cac_jax.data import masks, pipeline, sources, validate
from cac_jax.data.sources import DataError
from train_utils import REPO, tiny_config, write_image

K = 3  # classes of the folder datasets below


# ----------------------------------------------------------------------------
# A folder dataset (64 px, 3 classes) and a tiny config that trains on it.
# ----------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
  """labeled a..h, unlabeled u0..u7, val v0..v3; (root, tiny config on it)."""
  rng = np.random.default_rng(0)
  root = tmp_path / 'data'
  ids = {
    'labeled': [f'{c}' for c in 'abcdefgh'],
    'unlabeled': [f'u{i}' for i in range(8)],
    'val': [f'v{i}' for i in range(4)],
  }
  for split, names in ids.items():
    for name in names:
      write_image(root / 'images' / f'{name}.png', rng.integers(0, 256, (64, 64, 3), np.uint8))
      if split != 'unlabeled':
        mask = rng.integers(0, K, (64, 64)).astype(np.uint8)
        mask[:4, :4] = 255
        write_image(root / 'masks' / f'{name}.png', mask)
    (root / 'splits').mkdir(parents=True, exist_ok=True)
    (root / 'splits' / f'{split}.txt').write_text('\n'.join(names) + '\n')
  config = tiny_config(
    **{
      'data.name': 'folder',
      'data.root': str(root),
      'data.num_classes': K,
      'total_steps': 2,
      'eval_every': 1000,
    }
  )
  return root, config


def _data_error(fn) -> str:
  with pytest.raises(DataError) as info:
    fn()
  return str(info.value)


# ----------------------------------------------------------------------------
# Wrong results without a word.
# ----------------------------------------------------------------------------


def _bad_mask(root, name, value):
  mask = np.zeros((64, 64), np.uint8)
  mask[10:20, 10:20] = value
  write_image(root / 'masks' / f'{name}.png', mask)
  return str(root / 'masks' / f'{name}.png')


@pytest.mark.parametrize('split,name', [('val', 'v2'), ('labeled', 'c')])
def test_mask_value_outside_the_classes_is_a_data_error_naming_the_file(
  folder, tmp_path, split, name
):
  """Before: val ids >= K vanished from the confusion matrix; train ids gave NaN."""
  root, config = folder
  path = _bad_mask(root, name, K + 2)
  # Caught by the check before training ...
  message = _data_error(lambda: train.train_and_evaluate(config, str(tmp_path / 'run')))
  assert path in message and f'[{K + 2}]' in message and 'num_classes' in message
  assert not (tmp_path / 'run' / 'checkpoints').exists() or not os.listdir(
    tmp_path / 'run' / 'checkpoints'
  )
  # ... and, with the check off, by the pipelines' own decoder.
  config.data.validate = False
  if split == 'val':
    message = _data_error(lambda: list(pipeline.eval_iterator(config, multiple=1)))
  else:
    stream = pipeline.train_iterator(config, process_index=0, process_count=1)
    message = _data_error(lambda: [next(stream) for _ in range(8)])
  assert path in message and f'[{K + 2}]' in message


def test_one_image_decoder_for_training_and_predict(tmp_path):
  """16-bit gray PNGs and EXIF-rotated JPEGs decode the same in predict and training."""
  rng = np.random.default_rng(1)
  deep = rng.integers(0, 65536, (20, 24), dtype=np.uint16)
  Image.fromarray(deep).save(tmp_path / 'deep.png')
  stored = rng.integers(0, 256, (16, 24, 3), np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees on display
  Image.fromarray(stored).save(tmp_path / 'rotated.jpg', exif=exif, quality=95)
  for name in ('deep.png', 'rotated.jpg'):
    path = str(tmp_path / name)
    training = sources.decode_image(tf.constant(path), from_files=True).numpy()
    np.testing.assert_array_equal(predict.read_image(path), training)
  got = predict.read_image(str(tmp_path / 'deep.png'))
  # 16 -> 8 bits scales (v / 257, either rounding), it does not clip to white.
  assert np.abs(got[..., 0].astype(int) - deep / 257).max() <= 1
  assert (got == 255).mean() < 0.01
  # EXIF orientation is ignored everywhere: pixels as stored (PIL's JPEG decoder
  # is the independent reference; the accurate DCT gives its pixels exactly).
  rotated = predict.read_image(str(tmp_path / 'rotated.jpg'))
  assert rotated.shape == stored.shape
  np.testing.assert_array_equal(rotated, np.asarray(Image.open(tmp_path / 'rotated.jpg')))


def test_palette_mask_with_zero_filled_palette_keeps_ignore(tmp_path):
  """255 (ignore) in a palette whose unused entries are black decodes to 255, not 0."""
  index = np.zeros((8, 10), np.uint8)
  index[:, 3:6], index[:, 6:] = 1, 255
  palette = np.zeros((256, 3), np.uint8)
  palette[1] = (128, 0, 0)  # entries 2..255 zero-filled, like index 0
  write_image(tmp_path / 'm.png', index, palette)
  got = sources.decode_label(tf.constant(str(tmp_path / 'm.png')), True).numpy()
  np.testing.assert_array_equal(got, index)
  # Inside tf.data (graph mode) as in training.
  ds = tf.data.Dataset.from_tensors(str(tmp_path / 'm.png')).map(
    lambda p: sources.decode_label(p, True, num_classes=2)
  )
  np.testing.assert_array_equal(next(iter(ds)).numpy(), index)


@pytest.mark.parametrize(
  'field,value,needle',
  [
    ('optim.lr', -0.01, 'optim.lr=-0.01 must be positive'),
    ('optim.lr', 0.0, 'optim.lr=0.0 must be positive'),
    ('cac.weight', -0.1, 'cac.weight=-0.1 must be >= 0'),
    ('optim.momentum', 1.5, 'optim.momentum=1.5 must be in [0, 1)'),
    ('optim.weight_decay', -1e-4, 'optim.weight_decay=-0.0001 must be >= 0'),
    ('data.labeled_scale_range', (2.0, 0.5), 'data.labeled_scale_range=(2.0, 0.5) must be'),
    ('data.unlabeled_scale_range', (0.0, 2.0), 'data.unlabeled_scale_range=(0.0, 2.0)'),
    ('data.iou_range', (0.1, 1.5), 'data.iou_range=(0.1, 1.5) must be'),
    ('data.iou_range', (0.5, 0.2), 'data.iou_range=(0.5, 0.2) must be'),
    ('data.base_size', 0, 'data.base_size=0 must be positive'),
  ],
)
def test_config_ranges(field, value, needle):
  config = tiny_config(**{field: value})
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config, num_devices=8)
  assert needle in str(info.value)


def test_split_ids_keep_their_dots(tmp_path):
  (tmp_path / 's.txt').write_text('2007.000032\n/JPEGImages/2008.1.jpg /Seg/2008.1.png\na.b.PNG\n')
  assert sources.read_split_file(str(tmp_path / 's.txt')) == ['2007.000032', '2008.1', 'a.b']


# ----------------------------------------------------------------------------
# Lost or mixed records.
# ----------------------------------------------------------------------------


_HOLD_LOCK = (
  'import sys, time\n'
  'from cac_jax import run_dir\n'
  'lock = run_dir.WorkdirLock(sys.argv[1])\n'
  'lock.acquire()\n'
  'print("locked", flush=True)\n'
  'time.sleep(120)\n'
)


def test_second_training_in_one_workdir_is_refused(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  holder = subprocess.Popen(
    [sys.executable, '-c', _HOLD_LOCK, str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(config_lib.ConfigError) as info:
      train.train_and_evaluate(tiny_config(), str(workdir))
    assert f'PID {holder.pid}' in str(info.value) and 'another training run' in str(info.value)
    assert sorted(os.listdir(workdir)) == ['.lock']  # nothing written
    # Also within one process: a second lock on the same workdir is refused.
    with run_dir.WorkdirLock(str(tmp_path)):
      with pytest.raises(config_lib.ConfigError, match='in use'):
        run_dir.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()  # SIGKILL: the kernel drops the lock with the process
    holder.wait()
  with run_dir.WorkdirLock(str(workdir)):
    assert json.loads((workdir / '.lock').read_text())['pid'] == os.getpid()


def test_incompatible_config_is_refused_before_anything_is_written(tmp_path):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(**{'total_steps': 2, 'eval_every': 1000}), str(workdir))
  # Everything but the lock file (rewritten by every start) stays as it was.
  before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file() and p.name != '.lock'}
  changed = tiny_config(**{'data.num_classes': 4, 'data.crop_size': 32, 'total_steps': 4})
  with pytest.raises(config_lib.ConfigError) as info:
    train.train_and_evaluate(changed, str(workdir))
  message = str(info.value)
  assert 'data.crop_size: 64 -> 32' in message and 'data.num_classes: 6 -> 4' in message
  assert 'total_steps' not in message.split('. These')[0]  # allowed to change
  assert {
    p: p.read_bytes() for p in workdir.rglob('*') if p.is_file() and p.name != '.lock'
  } == before
  refused, allowed = run_dir.config_differences(
    json.loads((workdir / 'config.json').read_text()),
    tiny_config(**{'total_steps': 9, 'eval_every': 1000, 'eval.flip': True, 'log_every': 3}),
  )
  assert refused == [] and allowed == ['eval.flip', 'log_every', 'total_steps']


def _damage(workdir, step, how):
  state = workdir / 'checkpoints' / str(step) / 'state'
  if how == 'truncated':
    for f in (state / 'ocdbt.process_0' / 'd').iterdir():
      f.write_bytes(f.read_bytes()[:10])
  else:
    (state / '_METADATA').unlink()


@pytest.mark.parametrize('how', ['truncated', 'no_metadata'])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, how, capsys):
  workdir = tmp_path / 'run'
  config = tiny_config(**{'total_steps': 4, 'eval_every': 1000})
  train.train_and_evaluate(config, str(workdir))
  _damage(workdir, 4, how)
  # Inference moves nothing. It reads params and batch_stats alone (partial
  # restore by the model's own tree), so a lost _METADATA file does not stop
  # it; truncated arrays do, and it falls back to the intact step 2.
  _, _, _, step = saved_run.load_run(str(workdir), which='latest')
  assert step == (2 if how == 'truncated' else 4)
  assert (workdir / 'checkpoints' / '4').exists()
  if how == 'truncated':
    assert 'checkpoint 4 cannot be read' in capsys.readouterr().err
  # Training resumes from step 2, with the damaged step kept aside.
  scores = train.train_and_evaluate(config, str(workdir))
  assert 'miou' in scores
  err = capsys.readouterr().err
  assert re.search(
    r'checkpoint 4 is damaged and was skipped .*moved to .*damaged_checkpoints', err
  ), err
  assert len(os.listdir(workdir / 'damaged_checkpoints')) == 1
  assert sorted(int(s) for s in os.listdir(workdir / 'checkpoints')) == [2, 4]


# ----------------------------------------------------------------------------
# Tracebacks instead of a message: data faults met during training.
# ----------------------------------------------------------------------------


def _rgb_mask(root):
  write_image(root / 'masks' / 'b.png', np.zeros((64, 64, 3), np.uint8))
  return root / 'masks' / 'b.png', 'RGB'


def _size_mismatch(root):
  write_image(root / 'masks' / 'b.png', np.zeros((32, 64), np.uint8))
  return root / 'masks' / 'b.png', '64x32'


def _truncated_image(root):
  path = root / 'images' / 'b.png'
  path.write_bytes(path.read_bytes()[:200])
  return path, 'truncated'


def _missing_mask(root):
  (root / 'masks' / 'b.png').unlink()
  return root / 'masks' / 'b.png', 'does not exist'


@pytest.mark.parametrize('fault', [_rgb_mask, _size_mismatch, _truncated_image, _missing_mask])
def test_data_faults_are_found_before_the_first_step_and_inside_tf_data(folder, tmp_path, fault):
  root, config = folder
  path, needle = fault(root)
  message = _data_error(lambda: train.train_and_evaluate(config, str(tmp_path / 'run')))
  assert str(path) in message and needle in message, message
  # With the check off, the stream itself names the file (all 8 labeled
  # images are read by step 0: labeled batch 8).
  config.data.validate = False
  stream = pipeline.train_iterator(config, process_index=0, process_count=1)
  message = _data_error(lambda: next(stream))
  assert str(path) in message, message


def test_data_check_is_cached_by_file_list_sizes_and_mtimes(folder, tmp_path):
  root, config = folder
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  assert validate.check_before_training(config.data, workdir) is True
  assert validate.check_before_training(config.data, workdir) is False  # cached
  mask = root / 'masks' / 'a.png'
  os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))
  assert validate.check_before_training(config.data, workdir) is True


def test_masks_match_case_insensitively_and_directories_are_named(folder):
  root, config = folder
  os.rename(root / 'masks' / 'a.png', root / 'masks' / 'a.PNG')
  (root / 'images' / 'b.png').unlink()
  (root / 'images' / 'b.png').mkdir()
  message = _data_error(lambda: validate.validate_dataset(config.data))
  assert 'a.PNG' not in message  # found
  assert f'{root / "images" / "b.png"} is a directory' in message


def test_workdir_that_is_a_file_or_unwritable(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(config_lib.ConfigError, match='is a file, not a directory'):
    run_dir.check_writable(str(tmp_path / 'file'))
  with pytest.raises(config_lib.ConfigError, match='is a file, not a folder'):
    predict.check_out_dir(str(tmp_path / 'file'))
  # Read-only: root may write anywhere, except on a read-only mount.
  readonly = tmp_path / 'ro'
  readonly.mkdir()
  if (
    subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', str(readonly)], capture_output=True
    ).returncode
    != 0
  ):
    os.chmod(readonly, 0o555)  # not root: permissions suffice
    if os.geteuid() == 0:
      pytest.skip('cannot mount a read-only tmpfs here')
  try:
    with pytest.raises(config_lib.ConfigError, match='is not a writable directory'):
      run_dir.check_writable(str(readonly / 'run'))
    with pytest.raises(config_lib.ConfigError, match='is not a writable folder'):
      predict.check_out_dir(str(readonly / 'out'))
  finally:
    subprocess.run(['umount', str(readonly)], capture_output=True, check=False)


def test_checkpoint_write_error_blames_the_disk_only_for_storage_errors(tmp_path, monkeypatch):
  async def bug(self, x, directory):
    raise TypeError('unsupported type in the config')

  monkeypatch.setattr(ocp.JsonCheckpointHandler, '_save_fn', bug)
  with pytest.raises(ckpt_lib.CheckpointWriteError) as info:
    train.train_and_evaluate(tiny_config(**{'total_steps': 2}), str(tmp_path / 'run'))
  message = str(info.value)
  assert 'not in the storage' in message and 'free space' not in message
  assert 'TypeError: unsupported type in the config' in message
  assert ckpt_lib.is_storage_error(OSError(errno.ENOSPC, 'No space left on device'))
  assert ckpt_lib.is_storage_error(ValueError('RESOURCE_EXHAUSTED: ... No space left'))
  assert not ckpt_lib.is_storage_error(ValueError('Checkpoint path should be absolute'))


# ----------------------------------------------------------------------------
# Unclear or inconsistent.
# ----------------------------------------------------------------------------


def test_supervised_only_by_accident_is_warned():
  warnings = config_lib.warnings_for(tiny_config(**{'cac.unsup_start_step': 4}))
  assert len(warnings) == 1 and 'never starts' in warnings[0]
  assert not config_lib.warnings_for(tiny_config(**{'cac.unsup_start_step': 3}))
  assert not config_lib.warnings_for(
    tiny_config(**{'cac.unsup_start_step': 9, 'cac.supervised_only': True})
  )


def test_readme_sections_named_in_messages_exist(tmp_path):
  headings = re.findall(r'^#+ (.*)$', (REPO / 'README.md').read_text(), flags=re.M)
  for name in ('folder', 'voc'):
    config = tiny_config(**{'data.name': name, 'data.root': str(tmp_path / 'absent')})
    with pytest.raises(config_lib.ConfigError) as info:
      config_lib.validate(config, num_devices=8)
    section = re.search(r'README.md, "([^"]+)"', str(info.value)).group(1)
    assert section in headings, (section, headings)


def test_paths_are_resolved_once_urls_kept(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert paths.resolve('runs/a') == str(tmp_path / 'runs' / 'a')
  assert paths.resolve('~/w') == str(tmp_path / 'home' / 'w')
  assert paths.resolve('gs://bucket/run') == 'gs://bucket/run' and paths.resolve('') == ''
  config = tiny_config(
    **{'data.root': 'data', 'init_from': 'w.msgpack', 'data.labeled_split_file': '~/l.txt'}
  )
  paths.resolve_config(config)
  assert config.data.root == str(tmp_path / 'data')
  assert config.init_from == str(tmp_path / 'w.msgpack')
  assert config.data.labeled_split_file == str(tmp_path / 'home' / 'l.txt')
  config = tiny_config(**{'init_from': 'imagenet'})
  paths.resolve_config(config)
  assert config.init_from == 'imagenet'


# ----------------------------------------------------------------------------
# The command line: exit codes, one error line, a short stderr.
# ----------------------------------------------------------------------------


def _cli(*args, cwd=REPO, timeout=300):
  env = dict(
    os.environ,
    JAX_NUM_CPU_DEVICES='8',
    TF_CPP_MIN_LOG_LEVEL='3',
    CUDA_VISIBLE_DEVICES='',
    JAX_COMPILATION_CACHE_DIR=str(REPO / '.cache' / 'jax'),
  )
  return subprocess.run(
    [sys.executable, '-m', *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )


def _one_error_line(proc) -> str:
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  return errors[0]


@pytest.mark.slow
def test_cli_user_errors_exit_2(tmp_path):
  (tmp_path / 'file').write_text('x')
  proc = _cli('cac_jax.main', '--config=configs/tiny.py', f'--workdir={tmp_path / "file"}')
  assert proc.returncode == 2 and 'is a file' in _one_error_line(proc)
  proc = _cli(
    'cac_jax.main',
    '--config=configs/tiny.py',
    f'--workdir={tmp_path / "w"}',
    '--validate_only',
    '--config.data.iou_range=(0.1,1.5)',
    '--config.optim.lr=-1',
  )
  assert proc.returncode == 2
  assert 'data.iou_range' in proc.stderr and 'optim.lr=-1' in proc.stderr
  (tmp_path / 'empty').mkdir()
  proc = _cli(
    'cac_jax.predict',
    f'--workdir={tmp_path}',
    f'--images={tmp_path / "empty"}',
    f'--out={tmp_path / "out"}',
  )
  assert proc.returncode == 2 and 'no images found' in _one_error_line(proc)


@pytest.mark.slow
def test_disk_full_at_checkpoint_time_ends_with_a_short_stderr(tmp_path):
  mount = tmp_path / 'small'
  mount.mkdir()
  if (
    subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(mount)], capture_output=True
    ).returncode
    != 0
  ):
    pytest.skip('cannot mount a tmpfs here (needs root)')
  try:
    proc = _cli('cac_jax.main', '--config=configs/tiny.py', f'--workdir={mount / "run"}')
  finally:
    subprocess.run(['umount', str(mount)], check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = _one_error_line(proc)
  assert 'No space left on device' in line and 'Fix the checkpoint directory' in line
  assert 'Event loop is closed' not in proc.stderr
  # Start-up lines aside, what remains is a handful of lines, not thousands.
  noise = [
    l
    for l in proc.stderr.splitlines()
    if not re.match(r'^(I\d{4}|I0000|W\d{4}.*dataset_builder|WARNING: All log)', l)
  ]
  assert len(noise) <= 10, '\n'.join(noise)


def _png(width, height, bit_depth, color_type, pixel_bytes):
  """A minimal PNG (no filter) from raw rows, for encodings PIL cannot write."""
  import struct
  import zlib

  def chunk(kind, data):
    return (
      struct.pack('>I', len(data))
      + kind
      + data
      + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
    )

  row = pixel_bytes * width
  raw = b''.join(b'\x00' + row for _ in range(height))
  return (
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, bit_depth, color_type, 0, 0, 0))
    + chunk(b'IDAT', zlib.compress(raw))
    + chunk(b'IEND', b'')
  )


def test_sixteen_bit_gray_alpha_mask_is_refused_by_name():
  data = _png(5, 4, 16, 4, b'\x00\x02\xff\xff')  # value 2, opaque
  with pytest.raises(masks.MaskError, match='m.png decodes to'):
    masks.read_mask(data, 'm.png')
  # 16-bit gray without alpha is read as the stored values.
  np.testing.assert_array_equal(
    masks.read_mask(_png(5, 4, 16, 0, b'\x00\x02'), 'g.png'), np.full((4, 5), 2, np.uint8)
  )


def test_relative_paths_saved_before_resolution_still_resume():
  saved = json.loads(
    json.dumps(tiny_config(**{'data.labeled_split_file': 'splits/l.txt'}).to_dict())
  )
  now = tiny_config(**{'data.labeled_split_file': '/home/me/cac/splits/l.txt'})
  assert run_dir.config_differences(saved, now) == ([], [])
  other = tiny_config(**{'data.labeled_split_file': '/home/me/cac/splits/other.txt'})
  assert run_dir.config_differences(saved, other)[0] == ['data.labeled_split_file']
