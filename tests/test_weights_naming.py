"""The converter names torchvision's V1 ResNet files and warns on the V2 ones."""

import hashlib
import subprocess

from cac_jax.models import convert
from train_utils import REPO


def test_sha256_prefix_and_warning(tmp_path, monkeypatch):
  path = tmp_path / 'resnet50-x.pth'
  data = b'not a checkpoint, just bytes' * 1000
  path.write_bytes(data)
  assert convert.sha256_prefix(str(path)) == hashlib.sha256(data).hexdigest()[:8]
  assert convert.weights_warning(str(path), 'resnet50') is None
  monkeypatch.setattr(convert, 'sha256_prefix', lambda p: '11ad3fa6')
  warning = convert.weights_warning(str(path), 'resnet50')
  assert 'IMAGENET1K_V2' in warning and 'resnet50-0676ba61.pth' in warning
  assert convert.weights_warning(str(path), 'mobilenet_v2') is None


def test_repository_names_only_v1_files_as_the_ones_to_use():
  """Every mention of a V2 file is in the converter's warning tables or docstring."""
  out = subprocess.run(
    ['git', 'grep', '-n', '-e', '11ad3fa6', '-e', 'cd907fc2', '--', '*.py', '*.md', '*.sh'],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  hits = [
    l
    for l in out.stdout.splitlines()
    if not l.startswith(('cac_jax/models/convert.py', 'tests/test_weights_naming.py'))
  ]
  assert hits == []
