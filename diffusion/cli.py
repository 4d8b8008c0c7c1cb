"""Flag parsing shared by the entry points: absl flags + ml_collections config files, user errors as one line."""

import sys
from typing import Sequence

from absl import flags

from diffusion.errors import UserError


def parse_flags(argv: Sequence[str], config_flag: str | None = 'config') -> list[str]:
  """Parses `argv` into absl FLAGS; turns every flag error into a `UserError` that names the bad flag or key."""
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    raise UserError(_explain(e, argv, config_flag)) from None
  except (KeyError, AttributeError, TypeError, ValueError) as e:  # ml_collections override errors.
    raise UserError(_explain(e, argv, config_flag)) from None


def _explain(error: Exception, argv: Sequence[str], config_flag: str | None) -> str:
  message = str(error).strip().strip("'\"").replace('\\n', ' ').replace('\n', ' ')
  if config_flag:
    prefix = f'--{config_flag}.'
    for arg in argv[1:]:
      if arg.startswith(prefix):
        key = arg[len(prefix):].split('=', 1)[0]
        leaf = key.rsplit('.', 1)[-1]
        if f"'{leaf}'" in str(error) or leaf in message.split():
          return f'bad config override --{config_flag}.{key}: {message}'
  return message


def require(condition: bool, message: str) -> None:
  if not condition:
    raise UserError(message)


def stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)
