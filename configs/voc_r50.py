"""PASCAL VOC 2012 (+SBD), DeepLabv3+ ResNet-50, CAC — the paper's main setting.

  python -m cac_jax.main --config=configs/voc_r50.py:split=1323,datalist=0 \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.init_from=weights/resnet50.msgpack --workdir=gs://BUCKET/voc_r50_1323

`split` = number of labeled images (662 = 1/16, 1323 = 1/8, 2645 = 1/4,
10582 = full); `datalist` = which seeded random draw. To use the authors'
exact split files instead, also pass --config.data.labeled_split_file=... and
--config.data.unlabeled_split_file=... . Global batch 8 labeled + 8 unlabeled,
crop 320, 92,560 steps (80 "epochs" of 1157), DC loss from step 5,785.
Published (CAC, R50): 70.1 / 72.4 / 74.0 / 76.5 mIoU for 1/16 / 1/8 / 1/4 / full
(supervised only: 63.9 / 68.3 / 71.2 / 76.3).
"""

from cac_jax.config_lib import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, split=1323, datalist=0, supervised=0)
  config = base_config()
  d = config.data
  d.name = 'voc'
  d.num_classes = 21
  d.num_labeled = args['split']
  d.split_seed = args['datalist']
  d.crop_size = 320
  d.base_size = 400
  d.labeled_batch_size = 8
  d.unlabeled_batch_size = 8
  d.eval_batch_size = 8
  d.labeled_color_jitter = False
  config.model.backbone = 'resnet50'
  config.model.output_stride = 16
  config.cac.supervised_only = bool(args['supervised'])
  config.cac.bank_steps = 1
  config.cac.unsup_start_step = 5785
  config.optim.lr = 0.01
  config.total_steps = 92560
  config.eval_every = 1157
  config.checkpoint_every = 1157
  return config
