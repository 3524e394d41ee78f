"""Host-side checks of a dataset before training, with one clear message per problem.

`validate_source` opens every image and mask of a `Source` with PIL (fast, no
TensorFlow graph) and reports, all together in one `DataError`: missing, empty,
unreadable or truncated files, masks that are not single-channel/palette PNGs,
image/mask size mismatches, mask values outside [0, K) and 255 (read with the
training pipeline's own mask decoder, `masks.read_mask`), and duplicate ids.
`validate_dataset` also collects the structural problems `get_source` raises
(missing manual directory, empty or wrong split files) and labeled/unlabeled
overlap.

Run it from the command line:
  python -m cac_jax.data.validate --config=configs/default.py [--check_pixels=false]
"""

import hashlib
import io
import json
import os
from collections import Counter

from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from cac_jax.data import masks, sources
from cac_jax.data.sources import DataError

_IMAGE_FORMATS = ('PNG', 'JPEG', 'BMP', 'GIF')
_MASK_MODES = ('L', 'P', '1', 'LA', 'PA', 'I', 'I;16', 'I;16B', 'I;16L')


def _open(ref, from_files: bool, what: str, problems: list[str]):
  """Opens an image with PIL; on failure appends a problem and returns None."""
  name = ref if from_files else f'{what} (in-memory bytes)'
  if from_files:
    if os.path.isdir(ref):
      problems.append(
        f'{name} is a directory, not a file; replace it with the file or '
        'remove its id from the split'
      )
      return None
    if not os.path.isfile(ref):
      problems.append(f'{name} does not exist; add the file or remove its id from the split')
      return None
    if os.path.getsize(ref) == 0:
      problems.append(f'{name} is empty (0 bytes); replace it with the real file')
      return None
  elif not ref:
    problems.append(f'{name} is empty; regenerate the dataset')
    return None
  try:
    return Image.open(ref if from_files else io.BytesIO(ref))
  except Exception as e:  # PIL raises several types for unreadable files
    problems.append(
      f'{name} is not a readable image ({type(e).__name__}: {e}); '
      're-download or re-export it as PNG/JPEG'
    )
    return None


def _load(image, name: str, problems: list[str]) -> bool:
  """Decodes all pixels; catches truncated files PIL's header parse misses."""
  try:
    image.load()
    return True
  except Exception as e:
    problems.append(
      f'{name} is truncated or corrupt ({type(e).__name__}: {e}); re-download or re-export it'
    )
    return False


def _check_example(source, index, check_pixels, problems):
  image_ref = source.images[index]
  image_name = image_ref if source.from_files else f'image of id {source.ids[index]}'
  image = _open(image_ref, source.from_files, image_name, problems)
  if image is not None:
    with image:
      if image.format not in _IMAGE_FORMATS:
        problems.append(f'{image_name} is {image.format}, not PNG/JPEG; convert it')
      elif image.width == 0 or image.height == 0:
        problems.append(f'{image_name} has no pixels; replace it')
      elif check_pixels:
        _load(image, image_name, problems)
      image_size = image.size
  if source.labels is None:
    return
  mask_ref = source.labels[index]
  mask_name = mask_ref if source.from_files else f'mask of id {source.ids[index]}'
  if source.from_files and not os.path.exists(mask_ref):  # a directory: _open names it
    problems.append(
      f'{image_name} has no mask: {mask_ref} does not exist; add the mask '
      'or move the id to the unlabeled split'
    )
    return
  mask = _open(mask_ref, source.from_files, mask_name, problems)
  if mask is None:
    return
  with mask:
    if mask.format != 'PNG':
      problems.append(
        f'{mask_name} is {mask.format}; masks must be PNG (lossy JPEG changes class ids)'
      )
      return
    if mask.mode not in _MASK_MODES:
      problems.append(
        f'{mask_name} has mode {mask.mode}; colour masks are not class '
        'ids, save a gray (mode L) or palette (mode P) PNG of class ids'
      )
      return
    if image is not None and mask.size != image_size:
      problems.append(
        f'{mask_name} is {mask.size[0]}x{mask.size[1]} but its image '
        f'{image_name} is {image_size[0]}x{image_size[1]} (width x height); '
        'masks must match their images'
      )
      return
  if check_pixels:
    # The training pipeline's own decoder, so the check and training agree.
    try:
      if source.from_files:
        with open(mask_ref, 'rb') as f:
          data = f.read()
      else:
        data = mask_ref
      masks.read_mask(data, mask_name, label_map=source.label_map, num_classes=source.num_classes)
    except masks.MaskError as e:
      problems.append(str(e))


def source_problems(
  source: sources.Source, *, check_pixels: bool = True, allow_empty: bool = False
) -> list[str]:
  """Every problem of a Source, as messages (empty list if it is fine)."""
  problems = []
  if not source.ids and not allow_empty:
    problems.append('the split has no examples; add images to it')
  dups = sorted(i for i, n in Counter(source.ids).items() if n > 1)
  if dups:
    problems.append(f'duplicate ids {dups[:10]}; each image must be listed once')
  for index in range(len(source)):
    _check_example(source, index, check_pixels, problems)
  return problems


def validate_source(
  source: sources.Source, *, check_pixels: bool = True, allow_empty: bool = False
) -> None:
  """Raises DataError listing every problem of `source` (see module docstring).

  Args:
    source: the split to check.
    check_pixels: also decode every file and check mask values (slower);
      False checks existence, headers and sizes only.
    allow_empty: accept a split with no examples.
  """
  problems = source_problems(source, check_pixels=check_pixels, allow_empty=allow_empty)
  if problems:
    raise DataError(problems)


def validate_dataset(data_config, *, check_pixels: bool = True) -> dict[str, sources.Source]:
  """Builds and checks all three splits; raises one DataError with every problem.

  Returns:
    {'labeled': Source, 'unlabeled': Source, 'val': Source}.
  """
  problems, built, structural = [], {}, set()
  for split in sources.SPLITS:
    try:
      built[split] = sources.get_source(data_config, split)
    except DataError as e:
      # A missing root fails every split the same way: report it once.
      problems += [f'{split}: {p}' for p in e.problems if p not in structural]
      structural.update(e.problems)
      continue
    problems += [
      f'{split}: {p}'
      for p in source_problems(
        built[split], check_pixels=check_pixels, allow_empty=split == 'unlabeled'
      )
    ]
  if 'labeled' in built and 'unlabeled' in built:
    overlap = sorted(set(built['labeled'].ids) & set(built['unlabeled'].ids))
    if overlap:
      problems.append(
        f'labeled and unlabeled splits share {len(overlap)} id(s), e.g. '
        f'{overlap[:5]}; an image is either labeled or unlabeled'
      )
  if problems:
    raise DataError(problems)
  return built


def validate_config_data(config, *, check_pixels: bool = True) -> dict[str, sources.Source]:
  """`validate_dataset(config.data)` for a whole experiment config."""
  return validate_dataset(config.data, check_pixels=check_pixels)


CACHE_NAME = 'data_check.json'


def fingerprint(built: dict, data_config) -> str:
  """sha256 over every file's path, size and mtime (or the bytes of in-memory data).

  Changes when a file is added, removed, replaced or touched, or when the
  classes or the label map change; reading it costs one stat per file.
  """
  h = hashlib.sha256()
  h.update(json.dumps([data_config.name, int(data_config.num_classes)]).encode())
  for split in sorted(built):
    source = built[split]
    h.update(f'\0{split}\0{len(source)}'.encode())
    if source.label_map is not None:
      h.update(bytes(source.label_map))
    for ref in source.images + (source.labels or ()):
      if source.from_files:
        try:
          st = os.stat(ref)
          h.update(f'{ref}\0{st.st_size}\0{st.st_mtime_ns}\0'.encode())
        except OSError:
          h.update(f'{ref}\0missing\0'.encode())
      else:
        h.update(hashlib.sha1(ref).digest())
  return h.hexdigest()


def check_before_training(data_config, workdir: str, *, write_cache: bool = True) -> bool:
  """`validate_dataset` unless `<workdir>/data_check.json` shows these files passed.

  Returns:
    True if the files were checked now, False if the cache showed them checked.

  Raises:
    DataError: every problem found, as `--validate_only` reports them.
  """
  from etils import epath

  try:
    built = {split: sources.get_source(data_config, split) for split in sources.SPLITS}
  except DataError:
    built = None  # validate_dataset below reports why, with every other problem
  cache = epath.Path(workdir) / CACHE_NAME
  key = fingerprint(built, data_config) if built is not None else None
  if key is not None and cache.exists():
    try:
      if json.loads(cache.read_text()).get('fingerprint') == key:
        return False
    except (OSError, ValueError):
      pass
  validate_dataset(data_config)
  if write_cache and key is not None:
    cache.write_text(
      json.dumps({'fingerprint': key, 'checked': sum(len(s) for s in built.values())})
    )
  return True


def main(argv):
  del argv
  built = validate_config_data(flags.FLAGS.config, check_pixels=flags.FLAGS.check_pixels)
  for split, source in built.items():
    print(f'{split}: {len(source)} examples, {source.num_classes} classes: OK')


if __name__ == '__main__':
  # Flags are defined only when run as a script: importing this module from
  # cac_jax.main must not clash with its own --config flag.
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_bool('check_pixels', True, 'Decode every file and check mask values.')
  app.run(main)
