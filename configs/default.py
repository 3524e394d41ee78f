"""Default: CAC on the embedded texture-mosaic dataset, on a laptop CPU.

Run (from the repository root, after the README's set-up command):

  .venv/bin/python -m cac_jax.main --config=configs/default.py --workdir=workdirs/default

MobileNetV2 DeepLabv3+ (output stride 16) at 96 px crops, 8 labeled + 8
unlabeled images per step. It uses the real ImageNet MobileNetV2 weights when
they have been fetched (`python -m cac_jax.models.weights fetch-mobilenet`),
and random initialisation otherwise.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  # --- Data -----------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.name = 'embedded'          # embedded | voc | cityscapes | folder
  data.root = ''                  # manual dir (voc, cityscapes) or folder root
  data.num_classes = 6
  data.class_names = ()           # () = the dataset's own names
  # Labeled/unlabeled split of the training images.
  data.num_labeled = 16           # seeded random draw of this many labeled ids
  data.split_seed = 0             # which random draw (the authors' "datalist")
  data.labeled_split_file = ''    # authors'-format split files override the draw
  data.unlabeled_split_file = ''
  # Crops. Batch sizes are GLOBAL (all hosts, all devices).
  data.crop_size = 96
  data.base_size = 128
  data.labeled_batch_size = 8
  data.unlabeled_batch_size = 8
  data.eval_batch_size = 8
  data.labeled_scale_range = (0.5, 2.0)
  data.unlabeled_scale_range = (0.8, 2.0)
  data.iou_range = (0.1, 1.0)
  data.labeled_color_jitter = False  # the authors: VOC no, Cityscapes yes
  data.same_crop = False          # ablation: both views from one crop
  # The embedded texture-mosaic dataset (generated offline in seconds).
  data.embedded = ml_collections.ConfigDict()
  data.embedded.num_train = 256
  data.embedded.num_val = 64
  data.embedded.image_size = 128
  data.embedded.context_biased = False  # labeled split with biased context

  # --- Model ----------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.backbone = 'mobilenet_v2'  # resnet50 | resnet101 | mobilenet_v2 | resnet_tiny
  model.output_stride = 16
  model.projector = True
  model.proj_dim = 128
  model.dtype = 'float32'          # compute dtype: float32 | bfloat16
  config.init_from = 'imagenet-if-present'  # '' | path to converted weights | 'imagenet-if-present'

  # --- CAC (directional contrastive loss) ------------------------------------
  config.cac = cac = ml_collections.ConfigDict()
  cac.supervised_only = False
  cac.weight = 0.1
  cac.unsup_start_step = 100
  cac.temperature = 0.1
  cac.pos_threshold = 0.75
  cac.directional = True
  cac.filter_negatives = True
  cac.bank_steps = 1
  cac.neg_per_image = 0            # 0 = all cells of both views
  cac.chunk_size = 8192

  # --- Optimisation -----------------------------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 0.01
  optim.backbone_lr_mult = 0.1
  optim.momentum = 0.9
  optim.weight_decay = 1e-4
  optim.poly_power = 0.9
  config.total_steps = 600

  # --- Loop -------------------------------------------------------------------
  config.log_every = 20
  config.eval_every = 200
  config.checkpoint_every = 200
  config.keep_checkpoints = 2
  return config
