"""User-supplied paths, resolved once at the entry points.

Orbax needs absolute checkpoint paths, and a path given relative to the
directory a command was started from must not change meaning later. So every
path a user passes (`--workdir`, `data.root`, `init_from`, split files,
`predict --images/--out`) goes through `resolve`: `~` is expanded, relative
paths become absolute, and remote URLs (`gs://bucket/run`) are left as they
are. NumPy-free and TensorFlow-free.
"""

import os

# init_from values that name a weight source, not a file.
SPECIAL_INIT = ('', 'imagenet')
# config fields that hold a path (dotted), resolved by `resolve_config`.
CONFIG_PATH_FIELDS = (
  'data.root',
  'data.labeled_split_file',
  'data.unlabeled_split_file',
  'init_from',
  'fork_from',
)


def is_remote(path: str) -> bool:
  """True for URLs such as gs://bucket/dir (anything with a scheme://)."""
  return '://' in path


def resolve(path: str) -> str:
  """'' stays ''; URLs stay as they are; else the absolute path, `~` expanded."""
  if not path or is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_config(config) -> None:
  """Resolves every path field of an experiment config in place."""
  for field in CONFIG_PATH_FIELDS:
    *parents, last = field.split('.')
    target = config
    for p in parents:
      target = target[p]
    if field == 'init_from' and target[last] in SPECIAL_INIT:
      continue
    target[last] = resolve(str(target[last]))
