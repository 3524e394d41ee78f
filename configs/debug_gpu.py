"""Single-GPU smoke run: the paper's VOC model on the embedded data, short.

  launch/gpu_debug.sh            # or:
  python -m cac_jax.main --config=configs/debug_gpu.py --workdir=workdirs/debug_gpu

DeepLabv3+ ResNet-50 (random init unless --config.init_from is given) on the
embedded texture dataset at crop 128, 8 labeled + 8 unlabeled, 300 steps with
the DC loss from step 100, bf16 compute. It checks the whole path (data, three
passes, DC loss, bank, eval, checkpoints, TensorBoard) in minutes on one GPU.
"""

from cac_jax.config_lib import base_config


def get_config():
  config = base_config()
  config.data.name = 'embedded'
  config.data.crop_size = 128
  config.data.base_size = 128
  config.model.backbone = 'resnet50'
  config.model.dtype = 'bfloat16'
  config.cac.unsup_start_step = 100
  config.total_steps = 300
  config.log_every = 10
  config.eval_every = 100
  config.checkpoint_every = 100
  return config
