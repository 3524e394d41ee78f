"""The launch scripts: TPU pod dry run and shellcheck."""

import os
import shutil
import subprocess

import pytest

from train_utils import REPO


def _dry_run(*steps, **env):
  env = dict(
    os.environ,
    PROJECT='my-proj',
    ZONE='us-central2-b',
    ACCELERATOR='v4-16',
    NAME='cac-test',
    WORKDIR='gs://bucket/run',
    **env,
  )
  out = subprocess.run(
    ['bash', 'launch/tpu_pod.sh', '--dry-run', *steps],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  return out.stdout.splitlines()


def test_tpu_dry_run_prints_every_gcloud_command():
  lines = _dry_run(
    'all', CONFIG='configs/voc_r50.py:split=662', EXTRA_FLAGS='--config.data.root=/data/voc'
  )
  assert all(line.startswith('gcloud ') for line in lines), lines
  create = [l for l in lines if 'queued-resources create' in l]
  assert len(create) == 1 and '--accelerator-type=v4-16' in create[0]
  # One ssh to ALL workers starts training, so every worker runs the same command.
  train = [l for l in lines if 'cac_jax.main' in l]
  assert len(train) == 1
  assert '--worker=all' in train[0] and '--multihost' in train[0]
  assert 'configs/voc_r50.py:split=662' in train[0]
  assert 'gs://bucket/run' in train[0] and 'data.root=/data/voc' in train[0]
  setup = [l for l in lines if 'requirements' in l and 'ssh' in l]
  assert setup and all('--worker=all' in l for l in setup)
  logs = [l for l in lines if 'tail' in l]
  assert len(logs) == 1 and '--worker=0' in logs[0]


def test_tpu_script_requires_project_and_workdir():
  env = dict(os.environ, PROJECT='')
  out = subprocess.run(
    ['bash', 'launch/tpu_pod.sh', '--dry-run', 'create'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 2 and 'PROJECT' in out.stderr
  env = dict(os.environ, PROJECT='p', WORKDIR='')
  out = subprocess.run(
    ['bash', 'launch/tpu_pod.sh', '--dry-run', 'train'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 2 and 'WORKDIR' in out.stderr


@pytest.mark.skipif(
  shutil.which('shellcheck') is None, reason='shellcheck not installed (apt-get install shellcheck)'
)
def test_shellcheck_clean():
  scripts = sorted(str(p) for p in (REPO / 'launch').glob('*.sh'))
  out = subprocess.run(['shellcheck', *scripts], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout
