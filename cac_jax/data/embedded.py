"""The embedded default dataset: texture mosaics, generated offline in seconds.

Each image is a warped Voronoi mosaic (3-8 cells whose boundaries are bent by
smooth random displacement); each cell is filled with one of six textures:

  brick, grass, gravel  real CC0 texture photos shipped with scikit-image
  stripes, checker, dots  procedural, randomly oriented and sized

The class can only be read from LOCAL APPEARANCE (texture), never from the
colour or brightness of a pixel: every cell's texture is rank-transformed to a
standard normal marginal (so all classes have identical per-pixel value
distributions), then given a random mean, contrast and colour cast, drawn
independently of its class. A per-pixel colour classifier is therefore at
chance (tests/test_embedded.py measures it).

Train and val never share texture material: train crops come from the left
half of each photo, val crops from the right half; procedural textures use
disjoint random streams.

Splits: 'train' and 'val' are unbiased (each cell's class uniform over all
six). 'train_biased' (same size as 'train') is context-biased: classes come in
fixed neighbour pairs (brick+grass, gravel+stripes, checker+dots) and every
image uses exactly one pair, so in these images a class always has the same
neighbour. With `data.embedded.context_biased=True` the labeled images are
drawn from 'train_biased' while unlabeled and val images stay unbiased: a
model that learns "grass is what sits next to brick" from the labels fails on
val, which is the context over-fitting that CAC's two-context consistency on
unlabeled images is meant to cure.

The dataset is a TFDS builder (`cac_textures`) built once into
`$CAC_JAX_CACHE/tfds` (default: `<repo>/.cache/tfds`), so after
`import cac_jax.data.embedded`, `tfds.load('cac_textures', data_dir=...)`
works.
"""

import contextlib
import fcntl
import functools
import os
import pathlib

import numpy as np
import scipy.special
import skimage.data
import tensorflow_datasets as tfds
from etils import epath

from cac_jax import datasets
from cac_jax.data import sources

# The class names and colours live in the dataset table; the generator below
# draws the textures in this order.
CLASS_NAMES = datasets.get('embedded').class_names
NUM_CLASSES = len(CLASS_NAMES)
PALETTE = datasets.get('embedded').palette
# Context-biased images use exactly one of these neighbour pairs.
CONTEXT_PAIRS = ((0, 1), (2, 3), (4, 5))
_PHOTOS = ('brick', 'grass', 'gravel')
_SPLIT_CODES = {'train': 0, 'val': 1, 'train_biased': 2}
_DATASET_SEED = 20210628  # fixed: the dataset is part of the code
MIN_SIZE, MAX_SIZE = 32, 256  # a photo half is 512 x 256


def cache_dir() -> pathlib.Path:
  """`$CAC_JAX_CACHE/tfds`, or `<repo>/.cache/tfds` by default."""
  root = os.environ.get('CAC_JAX_CACHE') or pathlib.Path(__file__).resolve().parents[2] / '.cache'
  return pathlib.Path(root) / 'tfds'


# ----------------------------------------------------------------------------
# Generator (NumPy only; deterministic per (split, index)).
# ----------------------------------------------------------------------------


@functools.cache
def _photo(name: str) -> np.ndarray:
  photo = getattr(skimage.data, name)().astype(np.float32)
  photo.flags.writeable = False  # shared between calls
  return photo


def photo_half(name: str, split: str) -> np.ndarray:
  """The half of a texture photo a split may use: float32 [512, 256].

  Train uses columns [0, 256), val (and nothing else) columns [256, 512).
  """
  photo = _photo(name)
  half = photo.shape[1] // 2
  return photo[:, half:] if split == 'val' else photo[:, :half]


def _rotated_coords(rng, size):
  """Pixel coordinates rotated by a random angle and shifted by a random phase."""
  theta = rng.uniform(0, np.pi)
  y, x = np.mgrid[0:size, 0:size].astype(np.float32)
  u = x * np.cos(theta) + y * np.sin(theta) + rng.uniform(0, 100)
  v = -x * np.sin(theta) + y * np.cos(theta) + rng.uniform(0, 100)
  return u, v


def texture(class_id: int, split: str, rng: np.random.Generator, size: int) -> np.ndarray:
  """A [size, size] float32 texture patch of a class (arbitrary scale)."""
  name = CLASS_NAMES[class_id]
  if name in _PHOTOS:
    half = photo_half(name, split)
    y = rng.integers(0, half.shape[0] - size + 1)
    x = rng.integers(0, half.shape[1] - size + 1)
    patch = half[y : y + size, x : x + size]
    patch = np.rot90(patch, rng.integers(4))
    patch = patch[:, ::-1] if rng.random() < 0.5 else patch
    # Dither breaks ties between equal uint8 values before rank transforming.
    return patch + rng.uniform(0, 1, patch.shape).astype(np.float32)
  u, v = _rotated_coords(rng, size)
  if name == 'stripes':
    pattern = np.sin(2 * np.pi * u / rng.uniform(6, 14))
  elif name == 'checker':
    cell = rng.uniform(4, 9)
    pattern = np.sign(np.sin(np.pi * u / cell) * np.sin(np.pi * v / cell))
  else:  # dots on a rotated square lattice
    spacing = rng.uniform(8, 13)
    du = (u % spacing) - spacing / 2
    dv = (v % spacing) - spacing / 2
    pattern = (du**2 + dv**2 < (rng.uniform(0.2, 0.35) * spacing) ** 2).astype(np.float32)
  # Noise makes binary patterns rankable without raster-order artefacts.
  return (pattern + rng.normal(0, 0.15, pattern.shape)).astype(np.float32)


def warped_voronoi(rng: np.random.Generator, size: int, num_cells: int) -> np.ndarray:
  """int32 [size, size] cell index map with smoothly warped boundaries."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
  warp = []
  for _ in range(2):  # a sum of random low-frequency waves per axis
    w = np.zeros_like(x)
    for _ in range(3):
      fy, fx = rng.uniform(-3, 3, 2)
      w += np.sin(2 * np.pi * (fy * y + fx * x) + rng.uniform(0, 2 * np.pi))
    warp.append(w * rng.uniform(0.02, 0.05))
  wy, wx = y + warp[0], x + warp[1]
  seeds = rng.uniform(0, 1, (num_cells, 2)).astype(np.float32)
  dist = (wy[None] - seeds[:, 0, None, None]) ** 2 + (wx[None] - seeds[:, 1, None, None]) ** 2
  return np.argmin(dist, axis=0).astype(np.int32)


def _cell_classes(rng, num_cells, biased):
  """Class per cell; biased images use one neighbour pair, both classes present."""
  if not biased:
    return rng.integers(0, NUM_CLASSES, num_cells)
  pair = np.array(CONTEXT_PAIRS[rng.integers(len(CONTEXT_PAIRS))])
  while True:
    pick = rng.integers(0, 2, num_cells)
    if pick.min() != pick.max():
      return pair[pick]


def generate_example(split: str, index: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """One mosaic, a pure function of (split, index, size).

  Returns:
    image: uint8 [size, size, 3]; label: uint8 [size, size] class ids.
  """
  if split not in _SPLIT_CODES:
    raise ValueError(f'split must be one of {tuple(_SPLIT_CODES)}, got {split!r}')
  if not MIN_SIZE <= size <= MAX_SIZE:
    raise ValueError(
      f'data.embedded.image_size={size} must be in [{MIN_SIZE}, {MAX_SIZE}] '
      '(texture crops come from 512 x 256 photo halves)'
    )
  rng = np.random.default_rng([_DATASET_SEED, _SPLIT_CODES[split], index, size])
  cells = warped_voronoi(rng, size, int(rng.integers(3, 9)))
  classes = _cell_classes(rng, cells.max() + 1, split == 'train_biased')
  label = classes[cells].astype(np.uint8)
  texture_split = 'val' if split == 'val' else 'train'
  image = np.zeros((size, size, 3), np.float32)
  for cell in np.unique(cells):
    mask = cells == cell
    values = texture(int(classes[cell]), texture_split, rng, size)[mask]
    # Rank -> standard normal: every class gets the same value distribution.
    ranks = np.argsort(np.argsort(values, kind='stable'), kind='stable')
    z = scipy.special.ndtri((ranks + 0.5) / values.size)
    mean = rng.uniform(80, 176) + rng.uniform(-30, 30, 3)  # brightness + colour cast
    image[mask] = mean[None, :] + rng.uniform(20, 48) * z[:, None]
  return np.clip(np.round(image), 0, 255).astype(np.uint8), label


# ----------------------------------------------------------------------------
# TFDS builder.
# ----------------------------------------------------------------------------


class TexturesConfig(tfds.core.BuilderConfig):
  """Sizes of the mosaic dataset; the name encodes them."""

  def __init__(self, *, num_train: int = 256, num_val: int = 64, image_size: int = 128):
    super().__init__(
      name=f'n{num_train}_v{num_val}_s{image_size}',
      description=f'{num_train} train (+ as many context-biased) and '
      f'{num_val} val mosaics of {image_size} px',
    )
    self.num_train, self.num_val, self.image_size = num_train, num_val, image_size


class CacTextures(tfds.core.GeneratorBasedBuilder):
  """Texture-mosaic segmentation (see the module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [TexturesConfig()]

  # TFDS 4.9.10 derives `code_path` through `importlib_resources`, a package it
  # only declares for Python < 3.9, so on 3.12 `download_and_prepare` fails
  # with ModuleNotFoundError. The path only locates a checksums file (we have
  # none), so we state it directly.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'id': tfds.features.Text(),
          'image': tfds.features.Image(shape=(s, s, 3)),
          'segmentation_mask': tfds.features.Image(shape=(s, s, 1)),
        }
      ),
      supervised_keys=('image', 'segmentation_mask'),
      homepage='https://github.com/dvlab-research/Context-Aware-Consistency',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated locally
    c = self.builder_config
    return {
      'train': self._generate_examples('train', c.num_train),
      'train_biased': self._generate_examples('train_biased', c.num_train),
      'val': self._generate_examples('val', c.num_val),
    }

  def _generate_examples(self, split, count):
    for i in range(count):
      image, label = generate_example(split, i, self.builder_config.image_size)
      key = f'{split}_{i:05d}'
      yield key, {'id': key, 'image': image, 'segmentation_mask': label[..., None]}


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """Exclusive lock so concurrent processes (xdist, hosts) build only once."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def builder(embedded_config=None, data_dir=None) -> CacTextures:
  """The built (cached) `cac_textures` builder for `data.embedded` sizes."""
  e = embedded_config
  config = (
    TexturesConfig(num_train=int(e.num_train), num_val=int(e.num_val), image_size=int(e.image_size))
    if e is not None
    else TexturesConfig()
  )
  if config.num_train < 1 or config.num_val < 1:
    raise ValueError(
      f'data.embedded.num_train={config.num_train} and num_val={config.num_val} must be positive'
    )
  data_dir = pathlib.Path(data_dir or cache_dir())
  # TFDS refuses a config object that shadows a registered one: pass its name.
  registered = {c.name for c in CacTextures.BUILDER_CONFIGS}
  b = CacTextures(
    config=config.name if config.name in registered else config, data_dir=str(data_dir)
  )
  with _file_lock(data_dir / f'cac_textures_{config.name}.lock'):
    b.download_and_prepare()
  return b


def read_split(b: CacTextures, split: str) -> tuple[list[str], list[bytes], list[bytes]]:
  """(ids, image PNG bytes, mask PNG bytes) of a built split, sorted by id."""
  skip = tfds.decode.SkipDecoding()
  ds = b.as_dataset(
    split=split, shuffle_files=False, decoders={'image': skip, 'segmentation_mask': skip}
  )
  rows = sorted(
    (ex['id'].decode(), ex['image'], ex['segmentation_mask']) for ex in tfds.as_numpy(ds)
  )
  return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def get_source(data_config, split: str, data_dir=None) -> sources.Source:
  """A split of the embedded dataset as encoded PNG bytes (from_files=False)."""
  names, palette = sources.classes(data_config)
  b = builder(data_config.embedded, data_dir)
  biased = bool(data_config.embedded.context_biased)
  if split == 'val':
    ids, images, labels = read_split(b, 'val')
  else:
    # Context-biased: labeled images from the biased pool, unlabeled = all of
    # the unbiased train split (the two pools never share an image).
    pool = 'train_biased' if biased and split == 'labeled' else 'train'
    ids, images, labels = read_split(b, pool)
    if not (biased and split == 'unlabeled'):
      keep = set(sources.split_ids(data_config, ids, split))
      rows = [r for r in zip(ids, images, labels) if r[0] in keep]
      ids, images, labels = (list(c) for c in zip(*rows)) if rows else ([], [], [])
  # The unlabeled split keeps its masks too: they feed the DC-loss
  # diagnostics (pseudo-label accuracy, false negatives), never a loss.
  return sources.Source(
    ids=tuple(ids),
    images=tuple(images),
    labels=tuple(labels),
    from_files=False,
    num_classes=len(names),
    class_names=names,
    palette=palette,
  )
