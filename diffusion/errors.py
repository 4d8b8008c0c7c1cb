"""The user-error type and the command-line convention every entry point follows.

A user error (bad path, bad config value, empty prompt list) prints one line `error: ...` on stderr and exits with
code 2, never a traceback. Library code raises `UserError`; only entry points turn it into an exit.
"""

import functools
import sys
from typing import Callable, NoReturn


class UserError(ValueError):
  """An error in what the user asked for (config, flags, paths), as opposed to a bug."""


class ConfigError(UserError):
  """A config key holds a value the framework cannot use; the message names the key."""

  def __init__(self, key: str, message: str):
    super().__init__(f'config.{key}: {message}')
    self.key = key


def exit_with_error(message: str) -> NoReturn:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def user_errors_exit(main: Callable[..., object]) -> Callable[..., object]:
  """Decorator for entry points: a `UserError` becomes `error: ...` on stderr and exit code 2."""

  @functools.wraps(main)
  def wrapper(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      exit_with_error(str(e))

  return wrapper
