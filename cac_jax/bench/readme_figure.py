"""The README's picture of CAC's idea, drawn by the project's own pair sampler.

  python -m cac_jax.bench.readme_figure --out docs/pair_example.png

Left: one embedded-dataset image with the two crops of a CAC pair drawn in
its own frame (the sampler crops a rescaled copy; the corners are mapped
back). Middle and right: the two views as the network sees them (independently
flipped, blurred, colour-jittered, maybe grayscale), each with the overlap box
that the directional contrastive loss compares. The overlap shows the same
pixels in two different contexts.

Geometry comes from `pairs.pair_geometry` and pixels from `pairs.sample_pair`
with the same seed: sample_pair derives its geometry from pair_geometry, so
the rectangles and the views agree by construction.
"""

import os

import matplotlib

matplotlib.use('Agg')  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from matplotlib import patches  # noqa: E402

from cac_jax.data import embedded, pairs  # noqa: E402

_OUT = flags.DEFINE_string('out', 'docs/pair_example.png', 'Output PNG.')
_INDEX = flags.DEFINE_integer('index', 3, "Which 'train' image of the embedded set.")
_SEED = flags.DEFINE_integer('seed', 0, 'First pair seed tried (see find_pair).')

IMAGE_SIZE = 256  # the largest embedded image: most texture detail
CROP, BASE = 160, 192  # crop / base in the ratio of VOC's 320 / 400
VIEW_COLORS = ('tab:red', 'tab:blue')
OVERLAP_COLOR = 'yellow'


def find_pair(image_shape, first_seed: int, *, tries: int = 100):
  """The first seed >= first_seed whose pair is a real, partial overlap.

  The sampler falls back to two identical crops after 50 rejected tries, and
  may overlap almost fully; neither illustrates two contexts. We want crop 2
  accepted and an overlap covering 25-60% of a view.

  Returns:
    (seed [2] int64 array, geometry dict of NumPy values).
  """
  for k in range(first_seed, first_seed + tries):
    seed = np.array([0, k], np.int64)
    geo = pairs.pair_geometry(
      tf.constant(seed), image_shape[0], image_shape[1], crop_size=CROP, base_size=BASE
    )
    geo = {key: v.numpy() for key, v in geo.items()}
    top, left, bottom, right = geo['box1']
    frac = (bottom - top) * (right - left) / CROP**2
    if geo['accepted'] and 0.25 <= frac <= 0.6:
      return seed, geo
  raise RuntimeError(
    f'no suitable pair in seeds {first_seed}..{first_seed + tries - 1}; '
    'try another --seed or --index'
  )


def view_box(box, flipped: bool):
  """(top, left, bottom, right) in the unflipped frame -> as drawn on the view."""
  top, left, bottom, right = (int(v) for v in box)
  if flipped:
    left, right = CROP - right, CROP - left
  return top, left, bottom, right


def _rect(ax, top, left, bottom, right, color, style='-'):
  ax.add_patch(
    patches.Rectangle(
      (left - 0.5, top - 0.5),
      right - left,
      bottom - top,
      fill=False,
      edgecolor=color,
      linewidth=2.5,
      linestyle=style,
    )
  )


def make_figure(index: int, first_seed: int):
  """Builds the three-panel matplotlib figure; returns (figure, seed used)."""
  image, _ = embedded.generate_example('train', index, IMAGE_SIZE)
  seed, geo = find_pair(image.shape, first_seed)
  views = pairs.sample_pair(
    image, tf.constant(seed), crop_size=CROP, base_size=BASE, photometric=True
  )
  # Crop corners live in the rescaled image: map them back to the original.
  sy = image.shape[0] / geo['scaled_height']
  sx = image.shape[1] / geo['scaled_width']

  fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
  ax = axes[0]
  ax.imshow(image)
  for v, color in zip((1, 2), VIEW_COLORS):
    y, x = geo[f'y{v}'], geo[f'x{v}']
    _rect(ax, y * sy, x * sx, (y + CROP) * sy, (x + CROP) * sx, color)
  ax.set_title('unlabeled image: two overlapping crops')
  for v, color in zip((1, 2), VIEW_COLORS):
    ax = axes[v]
    ax.imshow(np.clip(views[f'image{v}'].numpy(), 0, 255).astype(np.uint8))
    flipped = bool(views[f'flip{v}'].numpy())
    _rect(ax, *view_box(views[f'box{v}'].numpy(), flipped), OVERLAP_COLOR, '--')
    for side in ax.spines.values():
      side.set_edgecolor(color)
      side.set_linewidth(4)
    ax.set_title(f'view {v}{" (flipped)" if flipped else ""}, augmented')
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(
    'CAC: the overlap (dashed) appears in two contexts; its features should agree', fontsize=12
  )
  fig.tight_layout(rect=(0, 0, 1, 0.94))  # leave room for the suptitle
  return fig, seed


def main(argv):
  del argv
  fig, seed = make_figure(_INDEX.value, _SEED.value)
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  fig.savefig(_OUT.value, dpi=100)
  print(f'wrote {_OUT.value} (embedded train image {_INDEX.value}, pair seed {seed.tolist()})')


if __name__ == '__main__':
  app.run(main)
