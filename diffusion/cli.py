"""The one flag-parsing convention of every tool: absl flags, ml_collections config files, user errors as one line.

  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  cli.alias('batch-size', 'batch_size')                  # an old spelling keeps working
  command, path = cli.parse_flags(argv, None, commands={'import': ('source',), 'export': ('directory',)},
                                  required=('workdir',), doc=__doc__)

`--help` (or `-h`) prints the tool's docstring and its flags and exits 0. Sweeps take comma lists
(`comma_list`), adapters take one value per use of a repeated flag (`one_per`) and `DIR[:SCALE]` values
(`path_and_scale`).
"""

import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from absl import flags

from diffusion.errors import UserError
from diffusion.registry import Registry

T = TypeVar('T')
HELP_FLAGS = ('--help', '-h', '--helpshort', '--helpfull')
# A decimal number, as a user types a scale: `0.8`, `-1`, `1e-3` (not `inf`, `nan`, `1_0` or hex).
_NUMBER = re.compile(r'[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?')


def parse_flags(
  argv: Sequence[str],
  config_flag: str | None = 'config',
  positional: Sequence[str] = (),
  commands: Mapping[str, Sequence[str]] | None = None,
  required: Sequence[str] = (),
  doc: str | None = None,
) -> list[str]:
  """Parses `argv` into absl FLAGS; every flag error becomes a `UserError` that names the bad flag or key.

  Returns the positional arguments, one per name in `positional` (`('PATH1', 'PATH2')` for `eval.fid PATH1 PATH2`;
  a last name ending in `...` takes zero or more). With `commands` (command -> its positional names) the first
  argument is a command, checked against the known ones, and the result is `[command, *its arguments]`. Missing
  arguments and missing `required` flags are reported together; a stray argument is usually a typo (a missing `=`).
  `--help` prints `doc` (default: the `__main__` module's docstring) and the flags, then exits 0. A config file that
  fails to load is reported here rather than when its value is first read. Each call starts from the flags' defaults.
  """
  if any(arg in HELP_FLAGS for arg in _before_separator(argv[1:])):
    print(help_text(sys.modules['__main__'].__doc__ if doc is None else doc), flush=True)
    raise SystemExit(0)
  flags.FLAGS.unparse_flags()  # From the defaults: a second call in one process keeps nothing of the first.
  try:
    rest = flags.FLAGS(list(argv))
  except flags.Error as e:
    raise UserError(_explain(e, argv, config_flag)) from None
  except (KeyError, AttributeError, TypeError, ValueError) as e:  # ml_collections override errors.
    raise UserError(_explain(e, argv, config_flag)) from None
  given = list(rest[1:])
  if commands is not None:
    names = _command_arguments(given, commands)
  else:
    names = list(positional)
  _check_count(given, names, required)
  if config_flag and config_flag in flags.FLAGS:
    _check_config_loads(config_flag)
  return given


def _before_separator(args: Sequence[str]) -> list[str]:
  """The arguments before a `--` (after it, everything is positional)."""
  args = list(args)
  return args[: args.index('--')] if '--' in args else args


def _command_arguments(given: list[str], commands: Mapping[str, Sequence[str]]) -> list[str]:
  """The positional names for `given` when its first argument is a command: 'command' plus the command's own."""
  if not given:
    return [f'command ({"|".join(sorted(commands))})']
  known = Registry[Sequence[str]]('command')
  for name, arguments in commands.items():
    known.add(name, arguments)
  return ['command', *known.get(given[0])]


def _check_count(given: list[str], names: Sequence[str], required: Sequence[str]) -> None:
  """Refuses a stray argument; names every missing argument and missing required flag in one line."""
  variadic = bool(names) and names[-1].endswith('...')
  fixed = list(names[:-1]) if variadic else list(names)
  if len(given) > len(fixed) and not variadic:
    extra = given[len(fixed) :]
    raise UserError(f'unexpected argument(s) {" ".join(extra)!r}: flags are --name=value')
  missing = fixed[len(given) :] + [f'--{name}' for name in required if flags.FLAGS[name].value in (None, '', [])]
  if missing:
    raise UserError(f'the following arguments are required: {", ".join(missing)} (see --help)')


def _check_config_loads(config_flag: str) -> None:
  try:
    value = flags.FLAGS[config_flag].value
    if value is not None:
      value.keys  # pylint: disable=pointless-statement  # ml_collections raises here if the file failed to load.
  except (OSError, ValueError, SyntaxError, ImportError, AttributeError) as e:
    cause = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
    raise UserError(f'cannot load the --{config_flag} file: {cause}') from None


def _explain(error: Exception, argv: Sequence[str], config_flag: str | None) -> str:
  raw = str(error)
  if 'Traceback (most recent call last)' in raw:  # config_flags embeds the config file's traceback; keep its cause.
    raw = raw.strip().splitlines()[-1]
  message = ' '.join(raw.replace('\\n', ' ').replace('\\', '').replace("'", '').split())
  if isinstance(error, (KeyError, AttributeError)):
    message = f'no such key: {message}'
  if config_flag:
    prefix = f'--{config_flag}.'
    keys = [arg[len(prefix) :].split('=', 1)[0] for arg in argv[1:] if arg.startswith(prefix)]
    named = [k for k in keys if f'{prefix}{k}' in raw] or [k for k in keys if k.rsplit('.', 1)[-1] in raw]
    if named:
      return f'bad config override --{config_flag}.{named[0]}: {message}'
  return message


def help_text(doc: str | None) -> str:
  """The tool's docstring, then one line per flag it defines (absl's own logging flags left out)."""
  lines = [(doc or '').strip(), '', 'Flags:']
  defined = [
    flag
    for module, module_flags in flags.FLAGS.flags_by_module_dict().items()
    if not module.startswith('absl.')
    for flag in module_flags
  ]
  for flag in sorted({flag.name: flag for flag in defined}.values(), key=lambda f: f.name.replace('-', '_')):
    name = f'--[no]{flag.name}' if flag.boolean else f'--{flag.name}'
    default = flag.default_as_str or ''
    default = default[1:-1] if len(default) >= 2 and default[0] == default[-1] == "'" else default
    default = f' (default: {default})' if default not in ('', 'None') else ''
    lines.append(f'  {name}: {" ".join(str(flag.help).split())}{default}')
  return '\n'.join(lines)


def alias(old_name: str, name: str) -> None:
  """Keeps an old spelling of a flag working: `alias('batch-size', 'batch_size')` makes `--batch-size=8` set
  `--batch_size` (absl takes a hyphen in a flag name; `--noold-name` works for a boolean)."""
  flags.DEFINE_alias(old_name, name)


def comma_list(
  flag: flags.FlagHolder, kind: Callable[[str], T] = str, minimum: float | None = None, length: int | None = None
) -> list[T] | None:
  """A string flag's comma-separated values (None when unset), each converted by `kind`: `--guidance_scale=1,3,7`
  sweeps three values. With `minimum` each value must be >= it; with `length`, exactly that many values."""
  if flag.value is None:
    return None
  try:
    values = [kind(v.strip()) for v in str(flag.value).split(',')]
  except ValueError:
    values = []
  valid = (
    bool(values)
    and (length is None or len(values) == length)
    and (minimum is None or all(v >= minimum for v in values))
  )
  if not valid:
    number = 'an integer' if kind is int else 'a number'
    what = f'{number} >= {minimum}' if minimum is not None else f'a {getattr(kind, "__name__", "value")}'
    count = f'{length} comma-separated values, each {what}' if length else f'{what} or a comma list of them'
    raise UserError(f'--{flag.name} must be {count}, got {flag.value!r}')
  return values


def one_per(values: Sequence[T], items: Sequence[object], flag: str, item_flag: str, default: T) -> list[T]:
  """One value per use of a repeated flag: `--lora A --lora B --lora_scale 0.5 --lora_scale 1` gives each adapter
  its scale. No value at all gives every item `default`; any other count than one per item is a user error."""
  if not values:
    return [default] * len(items)
  if len(values) != len(items):
    raise UserError(
      f'--{flag} is given {len(values)} time(s) but --{item_flag} {len(items)}: give one --{flag} '
      f'per --{item_flag}, or none for {default!r} each'
    )
  return list(values)


def path_and_scale(text: str, default: float | None = None) -> tuple[str, float | None]:
  """`'dir:0.8'` -> `('dir', 0.8)`; the trailing `:x` is a scale only when it is a decimal number, so
  `gs://bucket/dir` and `C:\\dir` stay whole paths (with `default` as their scale)."""
  path, sep, scale = text.rpartition(':')
  if not sep or not _NUMBER.fullmatch(scale):
    path, scale = text, None
  if not path:
    raise UserError(f'{text!r} has no path: expected PATH or PATH:SCALE')
  return path, default if scale is None else float(scale)


def adapter_and_scale(text: str, flag: str) -> tuple[str, float]:
  """A repeated `--<flag> PATH[:SCALE]` value (scale 1 by default), e.g. `--lora style.safetensors:0.7`.

  Unlike `path_and_scale`, a trailing `:x` that is not a number is refused (unless the whole text is an existing
  path, or `x` holds the '/' or backslash of a URL or drive path), so a mistyped scale is not read as a missing file."""
  path, scale = path_and_scale(text, 1.0)
  head, sep, tail = text.rpartition(':')
  if path == text and sep and head and not os.path.exists(text) and not any(c in tail for c in '/\\'):
    raise UserError(f'--{flag} {text!r}: the scale {tail!r} is not a number (expected PATH or PATH:SCALE)')
  return path, scale


def require(condition: bool, message: str) -> None:
  """A user error with `message` unless `condition` holds."""
  if not condition:
    raise UserError(message)


def stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)
