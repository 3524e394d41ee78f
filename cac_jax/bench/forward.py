"""Forward-pass benchmark of DeepLabv3+ with each backbone.

  python -m cac_jax.bench.forward [--size 328] [--batch 1] [--repeats 5]
      [--backbones resnet_tiny,mobilenet_v2,resnet50,resnet101]
      [--markdown docs/forward.md]

For each backbone: parameter count (21 classes, projector 128) and the median
wall time of a jitted eval-mode forward pass (``train=False``, logits
upsampled to the input size), compilation excluded (timed separately). The
default 328 x 328 is the VOC evaluation crop 321 padded to a multiple of 8,
as the evaluation does. Randomly initialised weights: the time does not depend
on their values. Runs on JAX's default backend; no TensorFlow needed.
"""

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

from cac_jax.models import build_model
from cac_jax.models.convert import count_params

DEFAULT_BACKBONES = ('resnet_tiny', 'mobilenet_v2', 'resnet50', 'resnet101')


def benchmark(
  backbone: str,
  size: int,
  batch: int,
  repeats: int,
  output_stride: int = 16,
  dtype: str = 'float32',
  num_classes: int = 21,
) -> dict:
  """Parameter count, compile time and forward times of one configuration.

  Returns:
    {'backbone', 'params', 'compile_s', 'median_s', 'min_s'}.
  """
  cfg = ml_collections.ConfigDict(
    dict(backbone=backbone, output_stride=output_stride, projector=True, proj_dim=128, dtype=dtype)
  )
  model = build_model(cfg, num_classes=num_classes)
  x = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
  variables = jax.jit(
    lambda y: model.init(
      {'params': jax.random.key(1), 'dropout': jax.random.key(2)}, y, train=False
    )
  )(x)
  forward = jax.jit(lambda v, y: model.apply(v, y, train=False)['logits'])
  start = time.perf_counter()
  compiled = forward.lower(variables, x).compile()
  compile_s = time.perf_counter() - start
  compiled(variables, x).block_until_ready()  # warm-up run
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    compiled(variables, x).block_until_ready()
    times.append(time.perf_counter() - start)
  return {
    'backbone': backbone,
    'params': count_params(variables['params']),
    'compile_s': compile_s,
    'median_s': statistics.median(times),
    'min_s': min(times),
  }


def markdown_table(rows, size: int, batch: int, repeats: int, dtype: str) -> str:
  device = jax.devices()[0]
  lines = [
    f'DeepLabv3+ forward (eval, jitted, {dtype}), {size}x{size}, batch {batch}, '
    f'median of {repeats} runs after one warm-up, on {device.platform} '
    f'({device.device_kind}, {jax.device_count()} device(s)); JAX {jax.__version__}.',
    '',
    '| backbone | parameters | median forward (s) | min (s) | compile (s) |',
    '|---|---:|---:|---:|---:|',
  ]
  for r in rows:
    lines.append(
      f'| {r["backbone"]} | {r["params"]:,} | {r["median_s"]:.3f} | '
      f'{r["min_s"]:.3f} | {r["compile_s"]:.1f} |'
    )
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m cac_jax.bench.forward', description=__doc__.splitlines()[0]
  )
  parser.add_argument(
    '--size', type=int, default=328, help='square input size (321 padded to 328 by default)'
  )
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--backbones', default=','.join(DEFAULT_BACKBONES))
  parser.add_argument('--markdown', default='', help='also write the table here')
  args = parser.parse_args(argv)
  if args.size < 32 or args.batch < 1 or args.repeats < 1:
    parser.error('need --size >= 32, --batch >= 1 and --repeats >= 1')
  rows = []
  for backbone in args.backbones.split(','):
    row = benchmark(backbone.strip(), args.size, args.batch, args.repeats, dtype=args.dtype)
    print(
      f'{row["backbone"]:>13}: {row["params"]:>11,} params, '
      f'median {row["median_s"]:.3f} s, compile {row["compile_s"]:.1f} s',
      flush=True,
    )
    rows.append(row)
  table = markdown_table(rows, args.size, args.batch, args.repeats, args.dtype)
  print(table)
  if args.markdown:
    path = pathlib.Path(args.markdown)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
  return 0


if __name__ == '__main__':
  sys.exit(main())
