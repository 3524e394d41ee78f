"""Convert torchvision checkpoints into Flax variable trees (no torch needed).

The Flax modules are named so that a parameter path maps mechanically onto a
torchvision state-dict key (see :mod:`cac_jax.models.layers`):

  module path: joined with '.', every '_' read as '.'
      ('layer1_0', 'downsample_0')  -> 'layer1.0.downsample.0'
  leaf:  params kernel -> weight (conv OIHW -> HWIO, linear [out, in] -> [in, out])
         params scale  -> weight (BatchNorm gamma);  params bias -> bias
         batch_stats mean -> running_mean;  var -> running_var
  'num_batches_tracked' has no Flax counterpart and is skipped.

The mapping is driven by the *target* tree (from ``jax.eval_shape`` of the
module's init), so every Flax leaf must be found in the checkpoint (else:
'missing' error) and every checkpoint tensor must be used or explicitly
ignored (else: 'unknown' error). Shape mismatches name the tensor.

CLI (writes the backbone's {'params', 'batch_stats'} as flax msgpack, the
format ``config.init_from`` loads):

  python -m cac_jax.models.convert --arch resnet50 \\
      --input resnet50-0676ba61.pth --output resnet50_imagenet.msgpack

The CAC paper's backbones are torchvision's original (V1) ImageNet ResNets:
`resnet50-19c8e357.pth` (re-saved unchanged as `resnet50-0676ba61.pth`) and
`resnet101-5d3b4d8f.pth` (re-saved as `resnet101-63fe2227.pth`). torchvision's
newer V2-recipe files (`resnet50-11ad3fa6.pth`, `resnet101-cd907fc2.pth`) are
stronger ImageNet models and give results not comparable with the paper; the
converter warns when given one (torchvision names each file by the first 8
hex digits of its sha256).
"""

import argparse
import hashlib
import os
import pathlib
import sys
from typing import Any, Mapping

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from cac_jax import backbones
from cac_jax.models import builder, mobilenet_v2, torch_pickle

_LEAF_NAMES = {
  ('params', 'kernel'): 'weight',
  ('params', 'scale'): 'weight',
  ('params', 'bias'): 'bias',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}
_MAX_LISTED = 30


def torch_key(collection: str, path: tuple[str, ...]) -> str:
  """The torchvision state-dict key of a Flax leaf.

  Args:
    collection: 'params' or 'batch_stats'.
    path: the leaf's path inside the collection, e.g. ('layer1_0', 'conv1',
      'kernel').

  Raises:
    ValueError: the leaf name has no torch counterpart.
  """
  leaf = _LEAF_NAMES.get((collection, path[-1]))
  if leaf is None:
    raise ValueError(f'no torch name for Flax leaf {collection}/{"/".join(path)}.')
  return '.'.join(path[:-1]).replace('_', '.') + '.' + leaf


def _to_flax_layout(collection: str, leaf: str, value: np.ndarray) -> np.ndarray:
  if collection == 'params' and leaf == 'kernel':
    if value.ndim == 4:  # conv OIHW -> HWIO (depthwise: [C,1,k,k] -> [k,k,1,C])
      return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:  # linear [out, in] -> [in, out]
      return value.T
  return value


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  for name, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (name,))
    else:
      yield prefix + (name,), value


def _unflatten(items) -> dict:
  root: dict = {}
  for path, value in items:
    node = root
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return root


def _listing(names) -> str:
  names = sorted(names)
  shown = ', '.join(names[:_MAX_LISTED])
  more = len(names) - _MAX_LISTED
  return shown + (f' ... and {more} more' if more > 0 else '')


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray],
  target: Mapping[str, Any],
  ignore_prefixes: tuple[str, ...] = (),
) -> dict:
  """Maps a torch state dict onto a Flax variables tree.

  Args:
    state_dict: {torch key: array} (e.g. from :mod:`torch_pickle`).
    target: the Flax variables to fill, {'params': ..., 'batch_stats': ...};
      leaves may be arrays or ``jax.ShapeDtypeStruct`` (only shape and dtype
      are used).
    ignore_prefixes: torch key prefixes that are expected and dropped (e.g.
      'fc.' for a backbone).

  Returns:
    A tree like ``target`` with NumPy arrays in the target dtypes.

  Raises:
    ValueError: missing keys, unknown keys (both listed), or a shape mismatch
      (naming the tensor).
  """
  converted, missing, used = [], [], set()
  for collection, tree in target.items():
    for path, leaf in _flatten(tree):
      key = torch_key(collection, path)
      if key not in state_dict:
        missing.append(key)
        continue
      used.add(key)
      value = _to_flax_layout(collection, path[-1], np.asarray(state_dict[key]))
      if tuple(value.shape) != tuple(leaf.shape):
        raise ValueError(
          f'shape mismatch for {key!r} -> {collection}/{"/".join(path)}: '
          f'checkpoint gives {tuple(value.shape)} (after layout change), the '
          f'model expects {tuple(leaf.shape)}; is --arch right?'
        )
      converted.append(((collection,) + path, value.astype(leaf.dtype)))
  unknown = [
    k
    for k in state_dict
    if k not in used
    and not k.endswith('num_batches_tracked')
    and not k.startswith(tuple(ignore_prefixes))
  ]
  problems = []
  if missing:
    problems.append(f'missing from the checkpoint ({len(missing)}): {_listing(missing)}')
  if unknown:
    problems.append(f'unknown checkpoint keys ({len(unknown)}): {_listing(unknown)}')
  if problems:
    raise ValueError(
      'checkpoint does not match the model; '
      + '; '.join(problems)
      + '. Check that the architecture matches the file.'
    )
  return _unflatten(converted)


def abstract_variables(module, image_size: int = 64) -> dict:
  """Shapes/dtypes of ``module.init`` (no FLOPs, no memory)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda y: module.init(jax.random.key(0), y, train=False), x)


def convert_backbone(arch: str, state_dict: Mapping[str, np.ndarray]) -> dict:
  """torchvision ImageNet state dict -> backbone {'params', 'batch_stats'}.

  The architectures are the backbone table's entries with a torchvision
  checkpoint (`cac_jax/backbones.py`); the entry's `torchvision_unused`
  prefixes (the classifier: ResNet 'fc', MobileNetV2 'features.18' and
  'classifier') are dropped. Parameters do not depend on the output stride.

  Raises:
    ValueError: unknown arch, or the state dict does not match it.
  """
  if arch not in backbones.convertible():
    raise ValueError(f'unknown --arch {arch!r}; choose one of {sorted(backbones.convertible())}.')
  entry = backbones.get(arch)
  module = builder.build_backbone(arch, entry.output_strides[-1])
  try:
    return convert_state_dict(state_dict, abstract_variables(module), entry.torchvision_unused)
  except ValueError as e:
    raise ValueError(f'converting a {arch} checkpoint: {e}') from None


def convert_mobilenet_v2_classifier(state_dict: Mapping[str, np.ndarray]) -> dict:
  """The full ImageNet MobileNetV2 (``MobileNetV2(output_stride=32,
  include_top=True)``), classifier included; nothing is ignored."""
  module = mobilenet_v2.MobileNetV2(output_stride=32, include_top=True)
  return convert_state_dict(state_dict, abstract_variables(module, 224))


def save_variables(variables: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes {'params', 'batch_stats'} as flax msgpack (atomically)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  data = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(variables)))
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_bytes(data)
  os.replace(tmp, path)


def load_backbone(path: str | os.PathLike) -> dict:
  """Reads a converted backbone file: {'params': ..., 'batch_stats': ...}.

  Raises:
    FileNotFoundError: the path does not exist (with how to create it).
    ValueError: the file is not a converted backbone.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
      f'{path} does not exist; create it with `python -m '
      'cac_jax.models.convert --arch ... --input ....pth --output ...` or '
      '`python -m cac_jax.models.weights fetch-mobilenet`.'
    )
  variables = flax.serialization.msgpack_restore(path.read_bytes())
  if not isinstance(variables, dict) or 'params' not in variables:
    raise ValueError(f'{path} is not a converted backbone (no "params" entry).')
  return variables


def merge_backbone(variables: Mapping[str, Any], backbone_vars: Mapping[str, Any]) -> dict:
  """Replaces ``variables[col]['backbone']`` with converted backbone values.

  Args:
    variables: full model variables (arrays or ``jax.ShapeDtypeStruct``).
    backbone_vars: {'params': ..., 'batch_stats': ...} of the backbone alone.

  Returns:
    A new variables dict; the backbone leaves are NumPy arrays cast to the
    dtypes of the leaves they replace, everything else is passed through.

  Raises:
    ValueError: the trees differ (paths listed) or a shape differs (named),
      e.g. weights of resnet50 loaded into a resnet101 model.
  """
  merged = dict(variables)
  for collection, source in backbone_vars.items():
    if collection not in variables or 'backbone' not in variables[collection]:
      raise ValueError(f'model variables have no {collection}/backbone to load into.')
    target = dict(_flatten(variables[collection]['backbone']))
    given = dict(_flatten(source))
    only_target = ['/'.join(p) for p in target.keys() - given.keys()]
    only_given = ['/'.join(p) for p in given.keys() - target.keys()]
    if only_target or only_given:
      raise ValueError(
        f'backbone weights do not match the model ({collection}): missing '
        f'{_listing(only_target) or "none"}; unexpected '
        f'{_listing(only_given) or "none"}. Was the file converted for '
        'config.model.backbone?'
      )
    items = []
    for path, leaf in target.items():
      value = np.asarray(given[path])
      if value.shape != tuple(leaf.shape):
        raise ValueError(
          f'backbone weight {collection}/{"/".join(path)} has shape '
          f'{value.shape}, the model expects {tuple(leaf.shape)}.'
        )
      items.append((path, value.astype(leaf.dtype)))
    merged[collection] = {**variables[collection], 'backbone': _unflatten(items)}
  return merged


def count_params(tree: Mapping[str, Any]) -> int:
  """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# First 8 hex digits of the sha256 of torchvision's ResNet files.
V1_RESNET_HASHES = {
  '19c8e357': 'resnet50 V1',
  '0676ba61': 'resnet50 V1 (re-saved)',
  '5d3b4d8f': 'resnet101 V1',
  '63fe2227': 'resnet101 V1 (re-saved)',
}
NON_V1_RESNET_HASHES = {'11ad3fa6': 'resnet50 IMAGENET1K_V2', 'cd907fc2': 'resnet101 IMAGENET1K_V2'}


def sha256_prefix(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()[:8]


def weights_warning(path: str, arch: str) -> str | None:
  """A warning if `path` is a known non-V1 torchvision ResNet file, else None."""
  if not arch.startswith('resnet'):
    return None
  prefix = sha256_prefix(path)
  if prefix in NON_V1_RESNET_HASHES:
    return (
      f"{path} is torchvision's {NON_V1_RESNET_HASHES[prefix]} file (sha256 "
      f'{prefix}...), not the original V1 weights the CAC paper used '
      '(resnet50-0676ba61.pth / resnet101-63fe2227.pth); results will not be '
      'comparable with the published numbers'
    )
  return None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m cac_jax.models.convert',
    description='Convert a torchvision ImageNet checkpoint to a cac_jax '
    'backbone (flax msgpack of params and batch_stats).',
  )
  parser.add_argument('--arch', required=True, choices=sorted(backbones.convertible()))
  parser.add_argument('--input', required=True, help='torchvision .pth file')
  parser.add_argument('--output', required=True, help='output .msgpack file')
  args = parser.parse_args(argv)
  warning = weights_warning(args.input, args.arch)
  if warning:
    print(f'warning: {warning}', file=sys.stderr)
  state_dict = torch_pickle.load_state_dict(args.input)
  variables = convert_backbone(args.arch, state_dict)
  save_variables(variables, args.output)
  print(
    f'{args.arch}: {count_params(variables["params"]):,} parameters, '
    f'{count_params(variables.get("batch_stats", {})):,} BatchNorm '
    f'statistics -> {args.output}'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
