"""Config validation: every user error gets a clear message, never a stack trace.

In-process checks of `config_lib.validate` (one ConfigError listing every
problem), and the CLI (`python -m cac_jax.main`) in subprocesses: user errors
exit with code 2 and an `error: ...` line on stderr without 'Traceback';
`--validate_only` prints 'config and data OK' for a good config.
"""

import importlib
import os
import subprocess
import sys

import pytest

from cac_jax import config_lib
from cac_jax.data import embedded, sources, validate
from train_utils import REPO, tiny_config

CONFIG_NAMES = sorted(p.stem for p in (REPO / 'configs').glob('*.py') if p.stem != '__init__')


def _problems(config, num_devices=8, num_processes=1) -> str:
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config, num_devices=num_devices, num_processes=num_processes)
  return str(e.value)


def _cli(*args, timeout=300):
  """Runs `python -m cac_jax.main` with 8 CPU devices; returns CompletedProcess."""
  env = dict(
    os.environ,
    JAX_NUM_CPU_DEVICES='8',
    TF_CPP_MIN_LOG_LEVEL='3',
    CUDA_VISIBLE_DEVICES='',
    JAX_COMPILATION_CACHE_DIR=str(REPO / '.cache' / 'jax'),
  )
  return subprocess.run(
    [sys.executable, '-m', 'cac_jax.main', *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_shipped_configs_are_valid(name, tmp_path):
  """No false positives: every configs/*.py passes once data.root exists.

  The paper configs (global batch 8) are checked on 8 devices; default.py is
  meant for one laptop CPU device (global batch 4 + 4).
  """
  config = importlib.import_module(f'configs.{name}').get_config()
  if config.data.name != 'embedded':
    config.data.root = str(tmp_path)
  config_lib.validate(config, num_devices=1 if name == 'default' else 8)


def test_unknown_keys_are_named():
  config = tiny_config()
  config.data.crop = 64  # typo of data.crop_size
  config.totl_steps = 10  # typo of total_steps
  message = _problems(config)
  assert "'data.crop'" in message and "'totl_steps'" in message
  assert 'typo' in message and 'config_lib.py' in message


@pytest.mark.parametrize('crop', [60, 4, 0, -8])
def test_crop_must_be_positive_multiple_of_8(crop):
  message = _problems(tiny_config(**{'data.crop_size': crop}))
  assert f'data.crop_size={crop} must be a positive multiple of 8' in message


def test_batches_must_divide_over_devices():
  config = tiny_config(
    **{'data.labeled_batch_size': 12, 'data.unlabeled_batch_size': 4, 'data.eval_batch_size': 16}
  )
  message = _problems(config, num_devices=8)
  assert 'data.labeled_batch_size=12 must be a positive multiple of the 8 devices' in message
  assert 'data.unlabeled_batch_size=4' in message
  assert 'eval_batch_size' not in message  # 16 is fine
  # Supervised-only runs have no unlabeled stream: its batch size is not checked.
  config_lib.validate(
    tiny_config(**{'data.unlabeled_batch_size': 3, 'cac.supervised_only': True}), num_devices=8
  )
  # Divisible by the devices but not by the hosts (uneven hosts).
  message = _problems(tiny_config(), num_devices=4, num_processes=3)
  assert 'data.labeled_batch_size=8 must be divisible by the 3 hosts' in message


def test_missing_init_from_weights(tmp_path):
  missing = str(tmp_path / 'resnet50.msgpack')
  message = _problems(tiny_config(init_from=missing))
  assert f'init_from={missing!r} does not exist' in message
  assert 'cac_jax.models.convert' in message  # says how to make the file
  message = _problems(tiny_config(init_from='imagenet'))  # resnet_tiny has none
  assert 'only available offline for mobilenet_v2' in message
  # The removed 'imagenet-if-present' mode names its replacements.
  message = _problems(tiny_config(init_from='imagenet-if-present'))
  assert "init_from='imagenet-if-present' was removed: use 'imagenet'" in message


def test_every_problem_is_reported_at_once(tmp_path):
  config = tiny_config(
    **{
      'data.crop_size': 60,
      'data.labeled_batch_size': 12,
      'init_from': str(tmp_path / 'none.msgpack'),
      'cac.temperature': 0.0,
      'model.output_stride': 32,
    }
  )
  lines = _problems(config).splitlines()
  assert lines[0] == 'invalid config:' and len(lines) == 6, lines


@pytest.fixture(scope='module')
def overlapping_split_files(tmp_path_factory):
  """Authors'-format split files for the tiny embedded dataset sharing one id."""
  config = tiny_config()
  train_ids = embedded.read_split(embedded.builder(config.data.embedded), 'train')[0]
  root = tmp_path_factory.mktemp('splits')
  labeled, unlabeled = root / 'labeled.txt', root / 'unlabeled.txt'
  labeled.write_text(''.join(f'/images/{i}.png /masks/{i}.png\n' for i in train_ids[:8]))
  unlabeled.write_text(''.join(f'/images/{i}.png\n' for i in train_ids[7:]))
  return str(labeled), str(unlabeled), train_ids[7]


def test_labeled_unlabeled_overlap_in_process(overlapping_split_files):
  labeled, unlabeled, shared = overlapping_split_files
  config = tiny_config(
    **{'data.labeled_split_file': labeled, 'data.unlabeled_split_file': unlabeled}
  )
  with pytest.raises(sources.DataError) as e:
    validate.validate_config_data(config, check_pixels=False)
  assert 'shares 1 id(s)' in str(e.value) and shared in str(e.value)


def _assert_user_error(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert 'Traceback' not in result.stderr + result.stdout, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in result.stderr, (fragment, result.stderr[-3000:])


@pytest.mark.slow
def test_cli_validate_only_ok(tmp_path):
  result = _cli('--config=configs/tiny.py', f'--workdir={tmp_path}', '--validate_only')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'config and data OK' in result.stdout


@pytest.mark.slow
def test_cli_split_overlap(tmp_path, overlapping_split_files):
  labeled, unlabeled, shared = overlapping_split_files
  result = _cli(
    '--config=configs/tiny.py',
    f'--workdir={tmp_path}',
    '--validate_only',
    f'--config.data.labeled_split_file={labeled}',
    f'--config.data.unlabeled_split_file={unlabeled}',
  )
  _assert_user_error(result, 'error: ', 'shares 1 id(s)', shared)


@pytest.mark.slow
def test_cli_invalid_values_listed_together(tmp_path):
  """Validation errors at training start: all listed, exit 2, no workdir written."""
  result = _cli(
    '--config=configs/tiny.py',
    f'--workdir={tmp_path / "w"}',
    '--config.data.crop_size=60',
    '--config.data.labeled_batch_size=12',
    f'--config.init_from={tmp_path / "missing.msgpack"}',
  )
  _assert_user_error(
    result,
    'error: invalid config:',
    'crop_size=60',
    'labeled_batch_size=12 must be a positive multiple of the 8 devices',
    'missing.msgpack',
  )
  assert not (tmp_path / 'w' / 'checkpoints').exists()


@pytest.mark.parametrize(
  'args, fragment',
  [
    # Mistyped override: config_flags raises a bare AttributeError.
    (['--config=configs/tiny.py', '--config.data.crop=64'], "'crop' is not a config field"),
    # Bad value type for an existing field.
    (['--config=configs/tiny.py', '--config.data.crop_size=abc'], 'crop_size=abc'),
    # ConfigError inside get_config(): config_flags embeds a traceback.
    (['--config=configs/voc_r50.py:spl=7'], "config argument 'spl=7'"),
    # Missing config file: config_flags raises only on first access.
    (['--config=configs/nope.py'], 'configs/nope.py'),
    (['--config=configs/tiny.py', '--config.model.backbone=resnet51'], "'resnet51' is not one of"),
  ],
)
def test_cli_flag_errors(tmp_path, args, fragment):
  _assert_user_error(_cli(*args, f'--workdir={tmp_path}', '--validate_only'), 'error: ', fragment)


def test_every_dc_option_of_the_config_reaches_the_dc_loss():
  """The training step and the step benchmark pass `losses.dc_options(cac)`:
  every `cac` field that `dc_loss_from_views` takes as a keyword must be in it."""
  import inspect

  from cac_jax import losses

  cac = config_lib.base_config().cac
  keywords = {
    name
    for name, p in inspect.signature(losses.dc_loss_from_views).parameters.items()
    if p.kind is p.KEYWORD_ONLY
  }
  assert set(losses.DC_OPTIONS) == keywords & set(cac.keys())
  options = losses.dc_options(cac)
  assert options == {name: cac[name] for name in losses.DC_OPTIONS}
  cac.temperature = 0.37  # read from the block, not fixed
  assert losses.dc_options(cac)['temperature'] == 0.37
