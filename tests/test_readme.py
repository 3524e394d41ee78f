"""The README's commands, run verbatim in a copy of the repository.

The set-up command (the main job), its rerun (which must resume), predict and
evaluate are read out of README.md and run as written, from the copy's root
with relative paths, appending only flags that make the run tiny. The copy
shares this checkout's .venv, so the set-up script finds everything installed
and goes straight to its job; `test_venv_script_installs_what_is_missing`
covers the install branch with a stand-in interpreter.
"""

import os
import pathlib
import re
import shutil
import subprocess

import pytest

from train_utils import REPO

pytestmark = pytest.mark.slow

# What makes the default run tiny (resnet_tiny on the tests' 24-image
# embedded set, 4 steps); nothing about paths or the command changes.
TINY = (
  '--config.total_steps=4 --config.eval_every=2 --config.checkpoint_every=2 '
  '--config.log_every=1 --config.model.backbone=resnet_tiny --config.init_from= '
  '--config.model.proj_dim=32 --config.data.embedded.num_train=24 '
  '--config.data.embedded.num_val=8 --config.data.embedded.image_size=64 '
  '--config.data.num_labeled=8 --config.data.base_size=64 '
  '--config.cac.unsup_start_step=2 --config.cac.pos_threshold=0'
)


def readme_commands() -> list[str]:
  """Every line of the README's ```bash blocks, continuation lines joined."""
  text = (REPO / 'README.md').read_text()
  lines = []
  for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
    block = block.replace('\\\n', ' ')
    lines += [re.sub(r'\s+#.*$', '', line).strip() for line in block.splitlines()]
  return [line for line in lines if line and not line.startswith('#')]


def command(prefix: str) -> str:
  found = [c for c in readme_commands() if c.startswith(prefix)]
  assert len(found) == 1, (prefix, readme_commands())
  return found[0]


def _copy_repository(target: pathlib.Path) -> None:
  """The files a clone has (tracked, plus new files not ignored), and the shared .venv."""
  listed = subprocess.run(
    ['git', 'ls-files', '-co', '--exclude-standard'],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split('\n')
  for name in filter(None, listed):
    source = REPO / name
    if source.is_file():
      (target / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(source, target / name)
  (target / '.venv').symlink_to(REPO / '.venv')


def _run(line: str, cwd, timeout=600) -> subprocess.CompletedProcess:
  env = dict(
    os.environ,
    CUDA_VISIBLE_DEVICES='',
    TF_CPP_MIN_LOG_LEVEL='3',
    JAX_COMPILATION_CACHE_DIR=str(REPO / '.cache' / 'jax'),
  )
  env.pop('JAX_NUM_CPU_DEVICES', None)  # one CPU device, as a user's laptop
  return subprocess.run(
    ['bash', '-c', line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )


@pytest.fixture(scope='module')
def clone(tmp_path_factory):
  root = tmp_path_factory.mktemp('clone')
  _copy_repository(root)
  return root


def test_readme_lists_the_two_setup_commands_and_the_test_command():
  text = (REPO / 'README.md').read_text()
  setup = text[text.index('## Set-up') : text.index('## Tests')]
  blocks = re.findall(r'```bash\n(.*?)```', setup, flags=re.S)
  assert blocks == ['bash launch/train.sh\nbash launch/test.sh\n']
  # CI runs the README's test command.
  assert 'bash launch/test.sh' in (REPO / '.ci' / 'run').read_text()


def test_lint_command_verbatim_passes():
  """The README's lint command (CI's first step) passes on this checkout."""
  lint = _run(command('bash launch/lint.sh'), REPO, timeout=300)
  assert lint.returncode == 0, lint.stdout[-3000:] + lint.stderr[-3000:]
  assert 'All checks passed!' in lint.stdout
  assert 'bash launch/lint.sh' in (REPO / '.ci' / 'run').read_text()


def test_main_job_resume_predict_and_evaluate_verbatim(clone):
  from PIL import Image

  from cac_jax.data import embedded

  train = command('bash launch/train.sh')
  first = _run(f'{train} {TINY}', clone)
  assert first.returncode == 0, first.stderr[-3000:]
  assert re.search(
    r'^final val mIoU: 0\.\d+ \(best 0\.\d+ at step \d+\)$', first.stdout, flags=re.M
  ), first.stdout
  # Relative to where the command ran: the copy's workdirs/, not this checkout's.
  workdir = clone / 'workdirs' / 'default'
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']

  again = _run(f'{train} {TINY}', clone)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resumed from step 4' in again.stderr

  photos = clone / 'my_photos'
  photos.mkdir()
  image, _ = embedded.generate_example('val', 0, 64)
  Image.fromarray(image[:50, :61]).save(photos / 'a.png')
  Image.fromarray(image).save(photos / 'b.jpg', quality=95)
  predict = _run(command('.venv/bin/python -m cac_jax.predict'), clone)
  assert predict.returncode == 0, predict.stderr[-3000:]
  assert predict.stdout.strip().splitlines()[-1] == '2 predicted, 0 skipped'
  mask = Image.open(clone / 'predictions' / 'a.png')
  assert mask.mode == 'P' and mask.size == (61, 50)

  evaluate = _run(command('.venv/bin/python -m cac_jax.evaluate'), clone)
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  assert re.search(r'^mIoU\s+\d+\.\d\d$', evaluate.stdout, flags=re.M), evaluate.stdout


def test_test_command_runs_pytest(clone):
  out = _run('bash launch/test.sh --collect-only -q tests/test_config.py', clone)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r'tests/test_config.py: \d+', out.stdout), out.stdout


def test_venv_script_installs_what_is_missing(tmp_path):
  """No stamp: the script installs requirements.txt, writes the stamp, then runs."""
  for name in ('launch/train.sh', 'launch/venv.sh', 'requirements.txt'):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / name, tmp_path / name)
  log = tmp_path / 'calls.log'
  fake = tmp_path / '.venv' / 'bin' / 'python'
  fake.parent.mkdir(parents=True)
  fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
  fake.chmod(0o755)
  out = subprocess.run(
    ['bash', 'launch/train.sh', '--config.total_steps=1'],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  calls = log.read_text().splitlines()
  assert calls[-2] == '-m pip install -q --disable-pip-version-check -r requirements.txt'
  assert calls[-1] == (
    '-m cac_jax.main --config=configs/default.py --workdir=workdirs/default --config.total_steps=1'
  )
  # A second call finds the stamp and installs nothing.
  log.write_text('')
  subprocess.run(['bash', 'launch/train.sh'], cwd=tmp_path, check=True, timeout=60)
  assert log.read_text().splitlines() == [
    '-m cac_jax.main --config=configs/default.py --workdir=workdirs/default'
  ]
