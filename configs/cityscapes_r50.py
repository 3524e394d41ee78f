"""Cityscapes, DeepLabv3+ ResNet-50, CAC.

  python -m cac_jax.main --config=configs/cityscapes_r50.py:split=372 \
      --config.data.root=/data/cityscapes \
      --config.init_from=weights/resnet50.msgpack --workdir=gs://BUCKET/cs_r50_372

`split` = labeled images: 372 (1/8), 744 (1/4), 2975 (full). Crop 720, base
2048, global batch 8 + 8, head lr 0.1, no feature bank, colour jitter on the
labeled crops. Published (CAC, R50): 69.7 / 72.7 / 77.5 mIoU for 1/8 / 1/4 /
full (supervised only: 66.0 / 70.7 / 77.7).
"""

from cac_jax.config_lib import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, split=372, datalist=0, supervised=0)
  config = base_config()
  d = config.data
  d.name = 'cityscapes'
  d.num_classes = 19
  d.num_labeled = args['split']
  d.split_seed = args['datalist']
  d.crop_size = 720
  d.base_size = 2048
  d.labeled_batch_size = 8
  d.unlabeled_batch_size = 8
  d.eval_batch_size = 8
  d.labeled_color_jitter = True
  config.model.backbone = 'resnet50'
  config.cac.supervised_only = bool(args['supervised'])
  config.cac.bank_steps = 0
  config.cac.unsup_start_step = 5785
  config.optim.lr = 0.1
  config.total_steps = 92560
  config.eval_every = 1157
  config.checkpoint_every = 1157
  return config
