"""A picture of a run's TensorBoard scalars, drawn from its event files.

  python -m cac_jax.bench.tb_scalars --workdir=workdirs/default --out=docs/tensorboard_scalars.png

One panel per group of tags: the losses, the DC diagnostics of both
directions (`dc_loss_gap`, `dc_valid_negatives`, the cosines, and with ground
truth the pseudo-label accuracies and the false-negative rate), the active
and overlap fractions, and val mIoU, as TensorBoard's Scalars tab shows them
for the same workdir (what `tensorboard --logdir=<workdir>` would display).
"""

import argparse
import pathlib

import numpy as np

from cac_jax.bench import ablation

PANELS = (
  ('losses', ('train/loss_ce', 'train/loss_dc_12', 'train/loss_dc_21')),
  (
    'dc_loss_gap: log(1 + M_valid) - loss (0 = uninformative)',
    ('train/dc_loss_gap_12', 'train/dc_loss_gap_21'),
  ),
  ('dc_valid_negatives (M_valid)', ('train/dc_valid_negatives_12', 'train/dc_valid_negatives_21')),
  (
    'cosine to the positive / to valid negatives',
    ('train/dc_cos_pos_12', 'train/dc_cos_neg_12', 'train/dc_cos_pos_21', 'train/dc_cos_neg_21'),
  ),
  (
    'pseudo-labels against the truth',
    (
      'train/dc_anchor_label_acc_12',
      'train/dc_target_label_acc_12',
      'train/dc_false_neg_rate_12',
      'train/dc_anchor_label_acc_21',
      'train/dc_false_neg_rate_21',
    ),
  ),
  ('anchors and overlap', ('train/active_frac_12', 'train/active_frac_21', 'train/overlap_frac')),
  ('val', ('val/miou', 'val/pixel_acc')),
)


def draw(workdir: pathlib.Path, out: pathlib.Path) -> list[str]:
  """Writes the figure; returns the tags drawn (a panel with none is left out)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  curves = ablation.read_curves(workdir)
  panels = [(title, [t for t in tags if curves.get(t)]) for title, tags in PANELS]
  panels = [p for p in panels if p[1]]
  if not panels:
    raise SystemExit(
      f'{workdir} holds no scalars of a training run (no event files, or not a cac_jax workdir)'
    )
  cols = 2
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
  drawn = []
  for ax, (title, tags) in zip(axes.flat, panels):
    for tag in tags:
      steps, values = np.array(curves[tag]).T
      ax.plot(steps, values, marker='.' if len(steps) < 20 else None, label=tag)
      drawn.append(tag)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels) :]:
    ax.axis('off')
  fig.suptitle(f'TensorBoard scalars of {"/".join(workdir.parts[-4:])}', fontsize=10)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return drawn


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', default='docs/tensorboard_scalars.png')
  args = parser.parse_args(argv)
  drawn = draw(pathlib.Path(args.workdir), pathlib.Path(args.out))
  print(f'{args.out}: {len(drawn)} tags')
  return drawn


if __name__ == '__main__':
  main()
