"""Input-pipeline throughput: labeled crops and CAC pairs, images per second.

  python -m cac_jax.bench.pipeline [--json out.json] [--config configs/x.py]
      [--batches 100] [--warmup 5]

Builds the per-host pipelines of `cac_jax.data.pipeline` for one host
(`process_count=1`) from the config's dataset (default: the embedded
texture-mosaic dataset; if it cannot be built, a synthetic set of random
128x128 images, reported as such) and times `--batches` batches after
`--warmup` warm-up batches (tf.data start-up and autotuning excluded).
Reported per stream: source images/s (for pairs, each image yields two
views) and ms per batch; plus whole training steps/s of `train_iterator`.
"""

import argparse
import importlib.util
import io
import json
import os
import pathlib
import platform
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cac_jax.data import (
  pipeline,  # noqa: E402
  sources,  # noqa: E402
)

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_config(path: str):
  """get_config() of a config file."""
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def synthetic_source(
  n: int = 64, size: int = 128, labeled: bool = True, num_classes: int = 6
) -> sources.Source:
  """Random RGB images with random class masks, as PNG bytes."""
  rng = np.random.default_rng(0)
  images, labels = [], []
  for _ in range(n):
    for array, out in [
      (rng.integers(0, 256, (size, size, 3), dtype=np.uint8), images),
      (rng.integers(0, num_classes, (size, size), dtype=np.uint8), labels),
    ]:
      buf = io.BytesIO()
      Image.fromarray(array).save(buf, format='PNG')
      out.append(buf.getvalue())
  return sources.Source(
    ids=tuple(str(i) for i in range(n)),
    images=tuple(images),
    labels=tuple(labels) if labeled else None,
    from_files=False,
    num_classes=num_classes,
    class_names=tuple(f'class{i}' for i in range(num_classes)),
    palette=np.zeros((num_classes, 3), np.uint8),
  )


def _time_batches(iterator, warmup: int, batches: int) -> float:
  """Seconds for `batches` batches after `warmup` untimed ones."""
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return time.perf_counter() - start


def run(config, *, warmup: int, batches: int) -> dict:
  """Measures the labeled, paired and combined pipelines; returns a dict."""
  try:
    labeled_src = sources.get_source(config.data, 'labeled')
    unlabeled_src = sources.get_source(config.data, 'unlabeled')
    dataset = config.data.name
  except Exception as e:  # noqa: BLE001 - any failure: fall back, say so.
    print(f'dataset {config.data.name!r} unavailable ({e}); using synthetic')
    labeled_src = synthetic_source(labeled=True)
    unlabeled_src = synthetic_source(labeled=False)
    dataset = 'synthetic 128x128'
  host = dict(start_step=0, process_index=0, process_count=1)
  data = config.data
  results = {
    'dataset': dataset,
    'crop_size': data.crop_size,
    'base_size': data.base_size,
    'cpus': os.cpu_count(),
    'machine': platform.processor() or platform.machine(),
    'warmup_batches': warmup,
    'timed_batches': batches,
  }
  for name, build, src, batch in [
    ('labeled', pipeline.labeled_dataset, labeled_src, data.labeled_batch_size),
    ('pairs', pipeline.unlabeled_dataset, unlabeled_src, data.unlabeled_batch_size),
  ]:
    ds = build(config, src, **host).prefetch(2)
    seconds = _time_batches(ds.as_numpy_iterator(), warmup, batches)
    results[name] = {
      'images_per_s': batch * batches / seconds,
      'ms_per_batch': 1e3 * seconds / batches,
      'batch_size': batch,
    }
  if dataset == config.data.name:
    seconds = _time_batches(
      pipeline.train_iterator(config, process_index=0, process_count=1), warmup, batches
    )
    results['train_steps_per_s'] = batches / seconds
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default=str(REPO / 'configs' / 'default.py'))
  parser.add_argument('--json', default='', help='also write results here')
  parser.add_argument('--batches', type=int, default=100)
  parser.add_argument('--warmup', type=int, default=5)
  args = parser.parse_args(argv)
  results = run(load_config(args.config), warmup=args.warmup, batches=args.batches)
  print(
    f'dataset: {results["dataset"]}, crop {results["crop_size"]}, '
    f'base {results["base_size"]}, {results["cpus"]} CPUs'
  )
  print('| stream | batch | images/s | ms/batch |')
  print('|---|---|---|---|')
  for name in ('labeled', 'pairs'):
    r = results[name]
    print(f'| {name} | {r["batch_size"]} | {r["images_per_s"]:.1f} | {r["ms_per_batch"]:.1f} |')
  if 'train_steps_per_s' in results:
    print(f'train_iterator (both streams): {results["train_steps_per_s"]:.2f} steps/s')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
