"""Flag parsing shared by the entry points: absl flags + ml_collections config files, user errors as one line."""

import sys
from typing import Sequence

from absl import flags

from diffusion.errors import UserError


def parse_flags(argv: Sequence[str], config_flag: str | None = 'config',
                positional: Sequence[str] = ()) -> list[str]:
  """Parses `argv` into absl FLAGS; turns every flag error into a `UserError` that names the bad flag or key.

  Returns the positional arguments: exactly one per name in `positional` (e.g. `('PATH1', 'PATH2')` for
  `eval.fid PATH1 PATH2`, or `('COMMAND', 'PATH')` for a tool with subcommands); any other count is a usage error
  (a stray argument is usually a typo, e.g. a missing `=`). A config file that fails to load is reported here
  rather than when its value is first read.
  """
  try:
    rest = flags.FLAGS(list(argv))
  except flags.Error as e:
    raise UserError(_explain(e, argv, config_flag)) from None
  except (KeyError, AttributeError, TypeError, ValueError) as e:  # ml_collections override errors.
    raise UserError(_explain(e, argv, config_flag)) from None
  given = list(rest[1:])
  if len(given) > len(positional):
    extra = given[len(positional):]
    raise UserError(f'unexpected argument(s) {" ".join(extra)!r}: flags are --name=value')
  if len(given) < len(positional):
    usage = ' '.join(positional)
    raise UserError(f'missing argument {positional[len(given)]}: usage {argv[0] if argv else ""} {usage} [--flags]')
  if config_flag and config_flag in flags.FLAGS:
    try:
      value = flags.FLAGS[config_flag].value
      if value is not None:
        value.keys  # pylint: disable=pointless-statement  # ml_collections raises here if the file failed to load.
    except (OSError, ValueError, SyntaxError, ImportError, AttributeError) as e:
      cause = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
      raise UserError(f'cannot load the --{config_flag} file: {cause}') from None
  return given


def _explain(error: Exception, argv: Sequence[str], config_flag: str | None) -> str:
  raw = str(error)
  if 'Traceback (most recent call last)' in raw:  # config_flags embeds the config file's traceback; keep its cause.
    raw = raw.strip().splitlines()[-1]
  message = ' '.join(raw.replace('\\n', ' ').replace('\\', '').replace("'", '').split())
  if isinstance(error, (KeyError, AttributeError)):
    message = f'no such key: {message}'
  if config_flag:
    prefix = f'--{config_flag}.'
    keys = [arg[len(prefix):].split('=', 1)[0] for arg in argv[1:] if arg.startswith(prefix)]
    named = [k for k in keys if f'{prefix}{k}' in raw] or [k for k in keys if k.rsplit('.', 1)[-1] in raw]
    if named:
      return f'bad config override --{config_flag}.{named[0]}: {message}'
  return message


def require(condition: bool, message: str) -> None:
  if not condition:
    raise UserError(message)


def stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)
