"""The config schema, its defaults, and validation with clear messages.

Every config file in configs/ starts from `base_config()` and overrides
fields, so `validate` can reject unknown keys (typos) against one schema.
What each backbone and dataset supports (output strides, ImageNet weights,
whether `data.root` is needed) is read from their tables,
`cac_jax/backbones.py` and `cac_jax/datasets.py`, not restated here.
"""

import os

import ml_collections

from cac_jax import backbones, datasets
from cac_jax.constants import FEATURE_STRIDE
from cac_jax.paths import SPECIAL_INIT

# config.bn.running_stats: where evaluation's BatchNorm statistics come from
# (cac_jax/precise_bn.py).
BN_RUNNING_STATS = ('all', 'labeled', 'precise')


class ConfigError(ValueError):
  """A user error in the config; the message says what to change."""


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults (the authors' VOC settings where they apply)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = d = ml_collections.ConfigDict()
  d.name = 'embedded'  # a name in cac_jax/datasets.py: embedded | voc | ...
  d.root = ''  # manual dir (voc, cityscapes) or folder root
  d.num_classes = 6
  d.class_names = ()  # () = the dataset's own names
  d.num_labeled = 16  # seeded random draw of this many labeled ids
  d.split_seed = 0  # which draw (the authors' "datalist")
  d.labeled_split_file = ''  # authors'-format split files override the draw
  d.unlabeled_split_file = ''
  d.crop_size = 96
  d.base_size = 128
  d.labeled_batch_size = 8  # GLOBAL batch sizes (all hosts, all devices)
  d.unlabeled_batch_size = 8
  d.eval_batch_size = 8
  d.labeled_scale_range = (0.5, 2.0)
  d.unlabeled_scale_range = (0.8, 2.0)
  d.iou_range = (0.1, 1.0)
  d.labeled_color_jitter = False  # the authors: VOC no, Cityscapes yes
  d.same_crop = False  # ablation: both views from one crop
  # Before the first step, open every image and mask and check them (as
  # --validate_only does); cached in <workdir>/data_check.json by file list,
  # sizes and mtimes, so a rerun skips it. False skips the check.
  d.validate = True
  d.embedded = ml_collections.ConfigDict()
  d.embedded.num_train = 256
  d.embedded.num_val = 64
  d.embedded.image_size = 128
  d.embedded.context_biased = False

  c.model = m = ml_collections.ConfigDict()
  m.backbone = 'mobilenet_v2'  # a name in cac_jax/backbones.py: resnet50 | ...
  m.output_stride = 16  # 8 | 16, as the backbone supports (backbones.py)
  m.projector = True
  m.proj_dim = 128
  m.dtype = 'float32'  # compute dtype: float32 | bfloat16
  # '' (random init) | path to a converted backbone (.msgpack) |
  # 'imagenet' (MobileNetV2 only; fetched if missing).
  c.init_from = ''
  # Start from another run's checkpoint: the workdir of that run ('' = no).
  # Its step, parameters, BatchNorm statistics, optimiser state and bank are
  # read (cac_jax/fork.py); this config's settings apply from there on. The
  # model and optimiser must match the source; init_from is then unused.
  # Used by the ablation's shared warm-up. fork_step: its step, -1 = latest.
  c.fork_from = ''
  c.fork_step = -1

  # cac: everything CAC adds to supervised training (the unlabeled stream,
  # the DC loss and its feature bank).
  c.cac = cac = ml_collections.ConfigDict()
  cac.supervised_only = False  # the baseline: no unlabeled stream at all
  cac.weight = 0.1
  cac.unsup_start_step = 5785  # 5 "epochs" of 1157 steps (VOC)
  cac.temperature = 0.1
  cac.pos_threshold = 0.75  # 0 disables positive filtering
  cac.directional = True
  cac.filter_negatives = True
  cac.bank_steps = 1  # previous steps kept as negatives
  cac.neg_per_image = 0  # 0 = all cells of both views
  cac.chunk_size = 1024  # negatives per chunk: scratch memory ~ anchors x chunk
  # DC-loss similarity matmul operands: 'auto' | 'float32' | 'bfloat16'
  # (accumulation is float32 either way). 'auto' = bfloat16 on GPU/TPU (tensor
  # cores; ~0.004/τ logit error) and float32 on CPU (no fast bf16 matmul there).
  cac.matmul_dtype = 'auto'
  # Only anchors with DC weight w > 0 (15-25% of VOC overlap cells) are scored,
  # in blocks of this fraction of a direction's anchors, while a block holds
  # one (negative_lse._active_rows); 0 scores every anchor. Same loss and gradient.
  cac.anchor_block = 0.125
  # The DC step's three network passes (labeled, view 1, view 2) as one call
  # of 3B with group-wise BatchNorm statistics and per-pass dropout keys
  # (train_step.fused_passes): 'auto' (on for GPU/TPU, off on CPU, where it
  # measures no faster) | 'on' | 'off'. Same step up to float summation order.
  cac.fused_passes = 'auto'

  c.optim = o = ml_collections.ConfigDict()
  o.lr = 0.01
  o.backbone_lr_mult = 0.1
  o.momentum = 0.9
  o.weight_decay = 1e-4
  o.poly_power = 0.9
  c.total_steps = 92560  # 80 "epochs" of 1157 steps

  c.eval = e = ml_collections.ConfigDict()
  e.flip = False  # average with the mirrored image
  e.scales = (1.0,)  # multi-scale: e.g. (0.75, 1.0, 1.25); (1.0,) = authors' protocol
  e.window = 0  # sliding-window size in px (multiple of 8); 0 = whole image
  # Images of different sizes share a canvas whose sides are their padded
  # sides rounded up to this (a multiple of 32); masks keep each image's
  # result exactly its own (docs/method.md). 0: one canvas per padded size.
  e.canvas_multiple = 128
  e.num_images_logged = 3  # val images drawn in TensorBoard
  # The fields above are the default evaluator (TensorBoard 'val/', the best
  # checkpoint's criterion). More evaluators, each under its own prefix:
  # {name: {'kind': 'miou' | 'images', 'split': 'labeled' | 'unlabeled' | 'val',
  #         <any field above>: value}}, unset fields as above; e.g.
  # {'labeled': {'split': 'labeled'}, 'val_flip': {'flip': True}}.
  # See cac_jax/evaluators.py.
  e.extra = ml_collections.ConfigDict()

  # Where evaluation's BatchNorm running statistics come from
  # (cac_jax/precise_bn.py, docs/method.md §5). 'all' (the authors): every
  # train-mode pass of a step updates them, labeled -> view 1 -> view 2, so
  # on DC steps 2/3 of the updates come from photometrically augmented
  # unlabeled views. 'labeled': the labeled pass's update only (the views
  # still normalise with their own batch statistics). 'precise': before each
  # evaluation and each checkpoint save, re-estimated from `precise_batches`
  # train-mode forward passes over un-augmented labeled training images
  # (pycls/Detectron2 "precise BN"). Cost, per evaluation and per save:
  # `precise_batches` forward passes of a labeled batch (no backward), where
  # a DC step makes three forward and backward passes.
  c.bn = b = ml_collections.ConfigDict()
  b.running_stats = 'all'  # 'all' | 'labeled' | 'precise'
  b.precise_batches = 8  # batches of data.labeled_batch_size ('precise' only)

  c.log_every = 50
  c.eval_every = 1157
  c.checkpoint_every = 1157
  c.keep_checkpoints = 2
  return c


# Dicts whose keys are names, not schema fields; their entries are checked
# where they are read (eval.extra: cac_jax/evaluators.py).
OPEN_KEYS = ('eval.extra',)


def _unknown_keys(cfg, schema, prefix=''):
  out = []
  for key in cfg.keys():
    if key not in schema:
      out.append(prefix + key)
    elif isinstance(schema[key], ml_collections.ConfigDict) and prefix + key not in OPEN_KEYS:
      out += _unknown_keys(cfg[key], schema[key], f'{prefix}{key}.')
  return out


def validate(config, *, num_devices: int, num_processes: int = 1) -> None:
  """Raises ConfigError listing every problem found (not just the first)."""
  problems = [
    f'unknown config key {k!r} (typo? see cac_jax/config_lib.py for the schema)'
    for k in _unknown_keys(config, base_config())
  ]
  if problems:  # the checks below assume the schema
    raise ConfigError('\n  '.join(['invalid config:'] + problems))
  d, m, cac = config.data, config.model, config.cac
  if d.crop_size % FEATURE_STRIDE or d.crop_size <= 0:
    problems.append(
      f'data.crop_size={d.crop_size} must be a positive multiple of '
      f'{FEATURE_STRIDE} (the DC loss works on the stride-{FEATURE_STRIDE} '
      'grid)'
    )
  batches = [
    ('data.labeled_batch_size', d.labeled_batch_size),
    ('data.eval_batch_size', d.eval_batch_size),
  ]
  if not cac.supervised_only:
    batches.append(('data.unlabeled_batch_size', d.unlabeled_batch_size))
  for name, size in batches:
    if size <= 0 or size % num_devices:
      problems.append(
        f'{name}={size} must be a positive multiple of the {num_devices} '
        f'devices (batch sizes are global)'
      )
    elif size % num_processes:
      problems.append(f'{name}={size} must be divisible by the {num_processes} hosts')
  problems += _dataset_problems(d)
  problems += _backbone_problems(m, config.init_from)
  if m.dtype not in ('float32', 'bfloat16'):
    problems.append(f'model.dtype={m.dtype!r} must be float32 or bfloat16')
  if config.init_from == 'imagenet-if-present':
    problems.append(
      "init_from='imagenet-if-present' was removed: use 'imagenet' (fetched if "
      "missing) or '' (random init)"
    )
  elif config.init_from not in SPECIAL_INIT and not os.path.exists(config.init_from):
    problems.append(
      f'init_from={config.init_from!r} does not exist; convert torchvision '
      'weights with `python -m cac_jax.models.convert` and pass the output'
    )
  if config.fork_step < -1:
    problems.append(f'fork_step={config.fork_step} must be a checkpoint step, or -1 for the latest')
  problems += _range_problems(config)
  if not 0.0 <= cac.pos_threshold < 1.0:
    problems.append(f'cac.pos_threshold={cac.pos_threshold} must be in [0, 1)')
  if cac.temperature <= 0:
    problems.append(f'cac.temperature={cac.temperature} must be positive')
  for name in ('bank_steps', 'neg_per_image', 'unsup_start_step'):
    if cac[name] < 0:
      problems.append(f'cac.{name}={cac[name]} must be >= 0')
  if cac.chunk_size <= 0:
    problems.append(f'cac.chunk_size={cac.chunk_size} must be positive')
  if cac.matmul_dtype not in ('auto', 'float32', 'bfloat16'):
    problems.append(
      f"cac.matmul_dtype={cac.matmul_dtype!r} must be 'auto', 'float32' or 'bfloat16'"
    )
  if cac.fused_passes not in ('auto', 'on', 'off'):
    problems.append(f"cac.fused_passes={cac.fused_passes!r} must be 'auto', 'on' or 'off'")
  if not 0 <= cac.anchor_block <= 1:
    problems.append(
      f'cac.anchor_block={cac.anchor_block} must be in [0, 1] (0 = score every anchor)'
    )
  problems += eval_option_problems(config.eval)
  if config.eval.get('extra'):
    from cac_jax import evaluators  # JAX; TensorFlow for the split names

    problems += evaluators.config_problems(config)
  problems += _bn_problems(config.bn)
  if config.total_steps <= 0:
    problems.append(f'total_steps={config.total_steps} must be positive')
  for name in ('log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints'):
    if config[name] <= 0:
      problems.append(f'{name}={config[name]} must be positive')
  if problems:
    raise ConfigError('\n  '.join(['invalid config:'] + problems))


def _bn_problems(b) -> list[str]:
  """`config.bn`: where the BatchNorm running statistics come from."""
  problems = []
  if b.running_stats not in BN_RUNNING_STATS:
    problems.append(
      f'bn.running_stats={b.running_stats!r} is not one of '
      f'{", ".join(repr(m) for m in BN_RUNNING_STATS)} (all: every pass of a '
      'step, the authors; labeled: the labeled pass only; precise: '
      're-estimated on un-augmented labeled images before each evaluation '
      'and save)'
    )
  count = b.precise_batches
  if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
    problems.append(
      f'bn.precise_batches={b.precise_batches!r} must be a positive integer '
      '(the batches each precise estimate runs)'
    )
  return problems


def eval_option_problems(e, where: str = 'eval') -> list[str]:
  """The options of one evaluator (config.eval, or an eval.extra entry merged into it)."""
  problems = []
  if e.window < 0 or e.window % FEATURE_STRIDE:
    problems.append(
      f'{where}.window={e.window} must be 0 (whole image) or a '
      f'positive multiple of {FEATURE_STRIDE}'
    )
  if e.canvas_multiple < 0 or e.canvas_multiple % 32:
    problems.append(
      f'{where}.canvas_multiple={e.canvas_multiple} must be 0 (one '
      'compiled shape per padded image size) or a positive multiple of 32'
    )
  if not e.scales or min(e.scales) <= 0:
    problems.append(
      f'{where}.scales={tuple(e.scales)} must be positive factors, e.g. (0.75, 1.0, 1.25)'
    )
  return problems


def _dataset_problems(d) -> list[str]:
  """`config.data`'s dataset facts, checked against the table in datasets.py."""
  problems = []
  if d.name not in datasets.DATASETS:
    problems.append(
      f'data.name={d.name!r} is not one of {datasets.names()} (the datasets of cac_jax/datasets.py)'
    )
  elif datasets.get(d.name).root_help is not None and not os.path.isdir(d.root):
    problems.append(
      f'data.root={d.root!r} is not a directory; set --config.data.root '
      f'to the {d.name} directory (see README.md, '
      f'"{datasets.get(d.name).root_help}")'
    )
  if d.num_classes < 2:
    problems.append(f'data.num_classes={d.num_classes} must be at least 2')
  # The classes are checked against the table where a split is built
  # (`sources.classes`), so that resuming can name a changed class count.
  return problems


def _backbone_problems(m, init_from: str) -> list[str]:
  """`config.model` and `init_from`, checked against the table in backbones.py."""
  if m.backbone not in backbones.BACKBONES:
    return [
      f'model.backbone={m.backbone!r} is not one of {backbones.names()} (the '
      'backbones of cac_jax/backbones.py)'
    ]
  backbone = backbones.get(m.backbone)
  problems = []
  if m.output_stride not in backbone.output_strides:
    allowed = ' or '.join(map(str, backbone.output_strides))
    others = [n for n in backbones.with_stride(m.output_stride) if n != m.backbone]
    fix = f'set --config.model.output_stride={backbone.output_strides[-1]}'
    if others:
      fix += f', or a backbone with stride {m.output_stride}: {", ".join(others)}'
    problems.append(
      f'model.output_stride={m.output_stride} is not supported by '
      f'{m.backbone} (it supports {allowed}); {fix}'
    )
  if init_from == 'imagenet' and backbone.imagenet_path is None:
    fetchable = ', '.join(backbones.with_imagenet_fetch()) or 'no backbone'
    how = (
      'convert torchvision weights with `python -m cac_jax.models.convert` and pass their path'
      if backbone.torchvision_unused is not None
      else "it has no ImageNet weights: set init_from=''"
    )
    problems.append(
      f"init_from='imagenet' is only available offline for {fetchable}; for {m.backbone} {how}"
    )
  return problems


def _pair(value):
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    return None
  return lo, hi


def _range_problems(config) -> list[str]:
  """The numeric ranges the data pipeline and optimiser need."""
  d, o, cac = config.data, config.optim, config.cac
  problems = []
  if d.base_size <= 0:
    problems.append(f'data.base_size={d.base_size} must be positive')
  for name in ('labeled_scale_range', 'unlabeled_scale_range'):
    pair = _pair(d[name])
    if pair is None or not 0 < pair[0] <= pair[1]:
      problems.append(
        f'data.{name}={tuple(d[name])} must be (lo, hi) with 0 < lo <= hi '
        '(the paper: (0.5, 2.0) labeled, (0.8, 2.0) unlabeled)'
      )
    elif d.base_size > 0 and int(pair[0] * d.base_size) < 1:
      problems.append(
        f'data.{name}[0] * data.base_size = {pair[0] * d.base_size} gives a '
        'long side under 1 pixel; raise the scale or base_size'
      )
  pair = _pair(d.iou_range)
  if pair is None or not 0.0 <= pair[0] <= pair[1] <= 1.0:
    problems.append(
      f'data.iou_range={tuple(d.iou_range)} must be (lo, hi) with '
      '0 <= lo <= hi <= 1 (the paper: (0.1, 1.0))'
    )
  if not o.lr > 0:
    problems.append(f'optim.lr={o.lr} must be positive (the paper: 0.01)')
  if not o.backbone_lr_mult >= 0:
    problems.append(f'optim.backbone_lr_mult={o.backbone_lr_mult} must be >= 0')
  if not 0 <= o.momentum < 1:
    problems.append(f'optim.momentum={o.momentum} must be in [0, 1)')
  if not o.weight_decay >= 0:
    problems.append(f'optim.weight_decay={o.weight_decay} must be >= 0')
  if not o.poly_power >= 0:
    problems.append(f'optim.poly_power={o.poly_power} must be >= 0')
  if not cac.weight >= 0:
    problems.append(
      f'cac.weight={cac.weight} must be >= 0 (0 runs the unlabeled passes '
      'without the DC gradient; the paper: 0.1)'
    )
  return problems


def warnings_for(config) -> list[str]:
  """Settings that are valid but probably not what was meant."""
  out = []
  cac = config.cac
  if not cac.supervised_only and cac.unsup_start_step >= config.total_steps:
    out.append(
      f'cac.unsup_start_step={cac.unsup_start_step} >= total_steps='
      f'{config.total_steps}: the DC loss never starts and this run trains '
      'supervised only; lower cac.unsup_start_step, or set '
      'cac.supervised_only=True to say so'
    )
  return out


def parse_arg(arg: str | None, **defaults) -> dict:
  """Parses a config-file argument 'k1=v1,k2=v2' (from --config=file.py:ARG).

  Values are converted to the type of the default; unknown keys are an error.
  """
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise ConfigError(
        f'config argument {item!r}: expected one of '
        f'{sorted(defaults)} as key=value, e.g. '
        + ','.join(f'{k}={v}' for k, v in defaults.items())
      )
    out[key] = type(defaults[key])(value)
  return out
