"""PASCAL VOC 2012 (+SBD), DeepLabv3+ ResNet-101, CAC.

  python -m cac_jax.main --config=configs/voc_r101.py:split=1323,datalist=0 \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.init_from=weights/resnet101.msgpack --workdir=gs://BUCKET/voc_r101_1323

As voc_r50.py with a ResNet-101 backbone and a feature bank of 2 steps.
Published (CAC, R101): 72.4 / 74.6 / 76.3 / 78.2 mIoU for 1/16 / 1/8 / 1/4 /
full (supervised only: 66.4 / 71.0 / 73.5 / 77.7).
"""

from configs import voc_r50


def get_config(arg=None):
  config = voc_r50.get_config(arg)
  config.model.backbone = 'resnet101'
  config.cac.bank_steps = 2
  return config
