"""Benchmark: ResNet-50 DeepLabv3+ convolutions, XLA's lowering vs `conv2d`'s.

  python -m cac_jax.bench.conv [--crop=160] [--batch=4] [--dtype=float32] [--json=out.json]

`cac_jax.models.layers.conv2d` computes PyTorch's Conv2d but rewrites some
convolutions for XLA:CPU (its docstring lists the rewrites: dead-tap
pruning, 1x1 as matmul, dilated as per-tap matmuls over real pixels, per-tap
kernel gradients for wide layers). This times, for the distinct layer shapes
of ResNet-50 DeepLabv3+ at output stride 16 and the given crop, one forward
pass plus both gradients (input and kernel) of the plain
`lax.conv_general_dilated` against `conv2d`, in `--dtype`, median of `--repeats`
runs after a warm-up, and checks they agree. The last column forces the
per-tap kernel gradient on every undilated 3x3 layer, narrow ones included:
the measurement behind `layers.TAP_GRAD_MIN_CHANNELS`.
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cac_jax.models import layers


def layer_shapes(crop: int):
  """(name, map size, C_in, C_out, kernel, dilation) at output stride 16."""
  s4, s8, s16 = -(-crop // 4), -(-crop // 8), -(-crop // 16)
  return (
    ('layer1 conv2 3x3', s4, 64, 64, 3, 1),
    ('layer1 conv3 1x1', s4, 64, 256, 1, 1),
    ('layer2 conv2 3x3', s8, 128, 128, 3, 1),
    ('layer3 conv2 3x3', s16, 256, 256, 3, 1),
    ('layer4 conv2 3x3 rate 2', s16, 512, 512, 3, 2),
    ('layer4 conv2 3x3 rate 8', s16, 512, 512, 3, 8),
    ('layer4 downsample 1x1', s16, 1024, 2048, 1, 1),
    ('aspp 3x3 rate 6', s16, 2048, 256, 3, 6),
    ('aspp 3x3 rate 18', s16, 2048, 256, 3, 18),
    ('decoder fuse1 3x3', s4, 304, 256, 3, 1),
  )


def _median_s(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def fwd_bwd(conv):
  """jit of (x, kernel, g) -> (y, dx, dkernel) for conv(x, kernel)."""

  def run(x, kernel, g):
    y, vjp = jax.vjp(conv, x, kernel)
    return (y,) + vjp(g)

  return jax.jit(run)


def run(crop: int = 160, batch: int = 4, repeats: int = 5, dtype: str = 'float32') -> list[dict]:
  rng = np.random.default_rng(0)
  rows = []
  for name, size, c_in, c_out, k, dilation in layer_shapes(crop):
    x = jnp.asarray(rng.standard_normal((batch, size, size, c_in)), dtype)
    kernel = jnp.asarray(rng.standard_normal((k, k, c_in, c_out)) / np.sqrt(k * k * c_in), dtype)
    g = jnp.asarray(rng.standard_normal((batch, size, size, c_out)), dtype)
    padding = layers.torch_padding(k, dilation)
    xla = fwd_bwd(lambda x_, k_: layers._lax_conv(x_, k_, 1, dilation, padding))  # pylint: disable=protected-access
    ours = fwd_bwd(lambda x_, k_: layers.conv2d(x_, k_, dilation=dilation))
    f64 = lambda a: np.asarray(a, np.float64)
    errs = [
      float(np.abs(f64(a) - f64(b)).max() / np.abs(f64(a)).max())
      for a, b in zip(xla(x, kernel, g), ours(x, kernel, g))
    ]
    t_xla = _median_s(xla, x, kernel, g, repeats=repeats)
    t_ours = _median_s(ours, x, kernel, g, repeats=repeats)
    t_tap = None  # the per-tap kernel gradient forced on every undilated 3x3
    if k == 3 and dilation == 1:
      tap = fwd_bwd(lambda x_, k_: layers._conv_tap_grad(x_, k_, 1, padding))  # pylint: disable=protected-access
      t_tap = _median_s(tap, x, kernel, g, repeats=repeats)
    # Dense FLOPs of forward + 2 gradients, as if every tap were real.
    gflop = 3 * 2 * batch * size * size * k * k * c_in * c_out / 1e9
    rows.append(
      dict(
        layer=name,
        size=size,
        c_in=c_in,
        c_out=c_out,
        kernel=k,
        dilation=dilation,
        batch=batch,
        crop=crop,
        dtype=dtype,
        dense_gflop=gflop,
        xla_ms=1e3 * t_xla,
        conv2d_ms=1e3 * t_ours,
        speedup=t_xla / t_ours,
        tap_grad_ms=None if t_tap is None else 1e3 * t_tap,
        max_rel_err=max(errs),
      )
    )
  return rows


def matmul_gflops(dtype: str = 'float32', repeats: int = 5) -> float:
  """The machine's matmul rate: a 6400x1024 . 1024x1024 product in `dtype`."""
  a = jnp.ones((6400, 1024), dtype)
  b = jnp.ones((1024, 1024), dtype)
  dot = jax.jit(lambda a, b: a @ b)
  return 2 * 6400 * 1024 * 1024 / 1e9 / _median_s(dot, a, b, repeats=repeats)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m cac_jax.bench.conv')
  parser.add_argument('--crop', type=int, default=160)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--json', default=None, help='also write the rows here')
  args = parser.parse_args(argv)
  rows = run(args.crop, args.batch, args.repeats, args.dtype)
  reference = matmul_gflops(args.dtype, args.repeats)
  print(
    f'backend {jax.default_backend()}, crop {args.crop}, batch {args.batch}, '
    f'{args.dtype}, forward + input and kernel gradients, median of {args.repeats}'
  )
  print(
    '| layer | map | C_in→C_out | XLA ms | conv2d ms | speed-up | max rel err '
    '| per-tap kernel grad ms |'
  )
  print('|---|---:|---|---:|---:|---:|---:|---:|')
  for r in rows:
    tap = '–' if r['tap_grad_ms'] is None else f'{r["tap_grad_ms"]:.1f}'
    print(
      f'| {r["layer"]} | {r["size"]}² | {r["c_in"]}→{r["c_out"]} | '
      f'{r["xla_ms"]:.1f} | {r["conv2d_ms"]:.1f} | {r["speedup"]:.2f}× | '
      f'{r["max_rel_err"]:.1e} | {tap} |'
    )
  print(f'matmul reference, 6400x1024 . 1024x1024 {args.dtype}: {reference:.0f} GFLOP/s')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'matmul_gflops': reference, 'rows': rows}, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
