"""What the command-line tools share: readable stderr on failures.

Orbax writes through TensorStore, whose C++ threads call back into asyncio
loops that orbax has already closed when a write fails (disk full, say);
each such callback prints a `RuntimeError: Event loop is closed` traceback,
hundreds of them, burying the one `error:` line that explains the failure.
`quiet_library_noise` drops exactly those, and keeps orbax's and TFDS's own
log records to warnings and one line each.
"""

import logging as std_logging
import sys

from absl import logging

_NOISY_PATHS = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/xla_bridge')


def _is_closed_loop_noise(exc_type, exc) -> bool:
  return exc_type is RuntimeError and str(exc) == 'Event loop is closed'


def quiet_library_noise() -> None:
  """Installs the filters (idempotent); call once at the start of a CLI's main."""
  if getattr(sys.excepthook, '_cac_filter', False):
    return
  previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(exc_type, exc, tb):
    if not _is_closed_loop_noise(exc_type, exc):
      previous_hook(exc_type, exc, tb)

  def unraisablehook(unraisable):
    if not _is_closed_loop_noise(unraisable.exc_type, unraisable.exc_value):
      previous_unraisable(unraisable)

  excepthook._cac_filter = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook

  def keep(record):
    if record.name == 'asyncio':
      # "Task exception was never retrieved": a second report of an orbax
      # read or write error that orbax raises (and the CLI explains) anyway.
      return False
    if not any(n in record.pathname for n in _NOISY_PATHS):
      return True
    # Library errors still show, as one line: the caller's `error:` line
    # explains them, their stack traces do not.
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return record.levelno >= std_logging.WARNING

  logging.get_absl_handler().python_handler.addFilter(keep)
