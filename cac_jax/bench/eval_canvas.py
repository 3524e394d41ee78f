"""What shared evaluation canvases cost and save: compiled shapes against pixels.

  python -m cac_jax.bench.eval_canvas [--sizes=voc-like|--config=configs/voc_r50.py]
      [--backbone=resnet50] [--batch=8] [--devices=8] [--measure]

Evaluation runs every val image at its own size (reflect-padded to a
multiple of 8). Batched by exact padded size, a val set needs one compiled
program per distinct size; on shared canvases (`eval.canvas_multiple`), a
bounded set, at the price of the canvas pixels beyond each image (masked,
but computed). For each canvas multiple (0 = one shape per padded size) this
prints the number of compiled shapes, batches, and the computed canvas
pixels relative to the padded image pixels. With --measure it also times,
on this machine's JAX backend, one compilation and one forward pass of the
network at a VOC-sized shape and extrapolates each plan's evaluation time:
shapes x compile time + canvas pixels x time per pixel.

Sizes: `--config` reads the val set of a dataset config (its headers only);
`--sizes=voc-like` draws 1,449 sizes with a long side of 500 and the other
side uniform in [100, 500], 70% landscape: a spread of sizes at least as
wide as VOC's, so an upper bound on the shapes a VOC-sized set needs.
"""

import argparse
import time

import numpy as np

MULTIPLES = (0, 32, 64, 128, 256)


def voc_like_sizes(n: int = 1449, seed: int = 0) -> list[tuple[int, int]]:
  rng = np.random.default_rng(seed)
  short = rng.integers(100, 501, n)
  landscape = rng.random(n) < 0.7
  return [(int(s), 500) if flat else (500, int(s)) for s, flat in zip(short, landscape)]


def plan_table(sizes, batch: int, devices: int) -> list[dict]:
  """Per canvas multiple: shapes, batches, computed / padded image pixels."""
  from cac_jax.data import pipeline

  padded = sum(pipeline._round_up(h, 8) * pipeline._round_up(w, 8) for h, w in sizes)
  rows = []
  for multiple in MULTIPLES:
    plan = pipeline.plan_batches(sizes, batch, devices, multiple)
    computed = sum(h * w * len(ids) for (h, w), ids in plan)
    rows.append(
      {
        'canvas_multiple': multiple,
        'shapes': len({s for s, _ in plan}),
        'batches': len(plan),
        'pixels': computed,
        'overhead': computed / padded,
      }
    )
  return rows


def measure(backbone: str, shape=(512, 384), canvas: bool = True) -> dict:
  """Compile seconds and forward seconds per pixel of the eval network at `shape`.

  canvas: run it as a shared canvas (masks on) or as one padded size (off).
  """
  import jax
  import jax.numpy as jnp
  import ml_collections

  from cac_jax import evaluate as eval_lib
  from cac_jax.models import build_model

  cfg = ml_collections.ConfigDict(
    dict(backbone=backbone, output_stride=16, projector=True, proj_dim=128, dtype='float32')
  )
  model = build_model(cfg, num_classes=21)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
  x = jnp.zeros((1, *shape, 3))
  sizes = jnp.asarray([shape], jnp.int32) if canvas else None
  fn = jax.jit(lambda v, x, s: eval_lib.predict_logits(model, v, x, sizes=s))
  t0 = time.perf_counter()
  compiled = fn.lower(variables, x, sizes).compile()
  compile_s = time.perf_counter() - t0
  compiled(variables, x, sizes).block_until_ready()
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    compiled(variables, x, sizes).block_until_ready()
    times.append(time.perf_counter() - t0)
  return {
    'compile_s': compile_s,
    'forward_s': min(times),
    'seconds_per_pixel': min(times) / (shape[0] * shape[1]),
    'shape': shape,
    'backend': jax.default_backend(),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='voc-like', choices=['voc-like'])
  parser.add_argument(
    '--config', default=None, help='a dataset config whose val image sizes to read instead'
  )
  parser.add_argument('--batch', type=int, default=8, help='data.eval_batch_size')
  parser.add_argument('--devices', type=int, default=8, help='devices (batch padding)')
  parser.add_argument('--backbone', default='resnet50')
  parser.add_argument(
    '--measure', action='store_true', help='time one compile and forward pass and extrapolate'
  )
  args = parser.parse_args(argv)
  if args.config:
    import runpy

    from cac_jax.data import pipeline, sources

    config = runpy.run_path(args.config)['get_config']()
    sizes = list(pipeline.eval_sizes(sources.get_source(config.data, 'val')))
    where = args.config
  else:
    sizes = voc_like_sizes()
    where = 'voc-like (1,449 sizes, long side 500, short side uniform in [100, 500])'
  rows = plan_table(sizes, args.batch, args.devices)
  timing = measure(args.backbone) if args.measure else None
  plain = measure(args.backbone, (504, 376), canvas=False) if args.measure else None
  print(
    f'val sizes: {where}; {len(set(sizes))} distinct sizes; eval batch {args.batch} '
    f'on {args.devices} devices'
  )
  if timing:
    for name, t in (('masked canvas', timing), ('one padded size', plain)):
      print(
        f'{args.backbone} OS16 float32 on {t["backend"]}, {name}: compile '
        f'{t["compile_s"]:.1f} s, forward {t["forward_s"]:.2f} s at '
        f'{t["shape"][0]}x{t["shape"][1]} (batch 1)'
      )
  head = '| canvas_multiple | compiled shapes | batches | computed / image pixels |'
  if timing:
    head += ' est. compile (s) | est. forward (s) | est. total (s) |'
  print(head)
  print('|' + '---|' * (head.count('|') - 1))
  for r in rows:
    line = (
      f'| {r["canvas_multiple"] or "0 (per size)"} | {r["shapes"]} | {r["batches"]} | '
      f'{r["overhead"]:.3f} |'
    )
    if timing:
      t = timing if r['canvas_multiple'] else plain
      c = r['shapes'] * t['compile_s']
      f = r['pixels'] * t['seconds_per_pixel']
      line += f' {c:.0f} | {f:.0f} | {c + f:.0f} |'
    print(line)


if __name__ == '__main__':
  main()
