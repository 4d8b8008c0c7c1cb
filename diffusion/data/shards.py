"""Shard lists from a config pattern, for the streamed sources (webdataset tar shards, parquet files).

A pattern is a brace pattern (`/data/{00000..00127}.tar`, `/data/{train,extra}-*.parquet`; numeric ranges keep
their zero padding), a glob (`*`, `?`, `[...]`), a comma-free mix of both, or the path of a text file listing one
pattern per line (blank lines and `#` comments skipped; relative lines are relative to the list file). Standard
library only, so validating a config stays cheap; `braceexpand` is not needed.

Each process reads a disjoint share of the shards (`process_share`), so a shard is the unit of sharding.
"""

from __future__ import annotations

import glob
import os
import re

from diffusion.errors import ConfigError, UserError

_RANGE = re.compile(r'^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$')
_GLOB_CHARS = re.compile(r'[*?\[]')


def expand_braces(pattern: str) -> list[str]:
  """Every string the brace pattern names, in order: 'a{1..3}' -> a1 a2 a3, 'x{a,b}y' -> xay xby; nested braces
  and several groups expand left to right. A brace group without ',' or '..' stays literal."""
  start = _first_group(pattern)
  if start is None:
    return [pattern]
  open_at, close_at = start
  body, prefix, suffix = pattern[open_at + 1 : close_at], pattern[:open_at], pattern[close_at + 1 :]
  alternatives = _alternatives(body)
  if alternatives is None:  # Literal braces: keep them, expand what follows.
    return [prefix + '{' + body + '}' + rest for rest in expand_braces(suffix)]
  out = []
  for alternative in alternatives:
    for middle in expand_braces(alternative):
      out.extend(prefix + middle + rest for rest in expand_braces(suffix))
  return out


def _first_group(pattern: str) -> tuple[int, int] | None:
  """(index of the first '{', index of its matching '}'), or None when the pattern has no complete group."""
  depth, open_at = 0, None
  for i, char in enumerate(pattern):
    if char == '{':
      open_at = i if depth == 0 else open_at
      depth += 1
    elif char == '}' and depth:
      depth -= 1
      if depth == 0:
        return open_at, i
  return None


def _alternatives(body: str) -> list[str] | None:
  """The parts of a group body: a numeric range, or top-level comma-separated alternatives; None if neither."""
  match = _RANGE.match(body)
  if match:
    lo, hi, step = int(match.group(1)), int(match.group(2)), int(match.group(3) or 1)
    width = max(len(match.group(1).lstrip('-')), len(match.group(2).lstrip('-')))
    padded = match.group(1).startswith('0') or match.group(2).startswith('0')
    values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
    return [f'{v:0{width}d}' if padded else str(v) for v in values]
  parts, depth, current = [], 0, ''
  for char in body:
    if char == ',' and depth == 0:
      parts.append(current)
      current = ''
      continue
    depth += (char == '{') - (char == '}')
    current += char
  parts.append(current)
  return parts if len(parts) > 1 else None


def list_shards(pattern: str, key: str, suffixes: tuple[str, ...]) -> list[str]:
  """The existing files `pattern` names, in order (duplicates dropped). A pattern that is an existing file not ending
  in one of `suffixes` (e.g. '.tar') is a list file. Raises `ConfigError(key, ...)` when it names no file, or when
  files it names explicitly (braces, lines of a list file) do not exist."""
  pattern = (pattern or '').strip()
  if not pattern:
    raise ConfigError(key, 'is empty: set it to a shard pattern (e.g. /data/{00000..00127}.tar) or a list file')
  lines, base = [pattern], ''
  if os.path.isfile(pattern) and not pattern.endswith(suffixes):
    base = os.path.dirname(os.path.abspath(pattern))
    with open(pattern, encoding='utf-8') as f:
      lines = [line.strip() for line in f if line.strip() and not line.strip().startswith('#')]
  paths, missing = [], []
  for line in lines:
    for path in expand_braces(os.path.join(base, line) if base else line):
      if _GLOB_CHARS.search(path):
        paths.extend(sorted(p for p in glob.glob(path) if os.path.isfile(p)))
      elif os.path.isfile(path):
        paths.append(path)
      else:
        missing.append(path)
  if not paths:
    raise ConfigError(key, f'{pattern!r} matches no file')
  if missing:
    count = f'{len(missing)} of {len(missing) + len(paths)}'
    raise ConfigError(key, f'{pattern!r} names files that do not exist ({count}, e.g. {missing[0]!r})')
  return list(dict.fromkeys(paths))


def split_pattern(section, split: str, train_split: str, eval_split: str, key: str) -> tuple[str, str]:
  """(pattern, its config key) of `split`: `<key>` for the training split, `eval_<key>` for the eval split (or `<key>`
  when that is empty: the training shards, as an image folder without split folders is read whole)."""
  prefix = key.rsplit('.', 1)[0]
  name = key.rsplit('.', 1)[1]
  if split == train_split:
    return section[name], key
  if split == eval_split:
    if section[f'eval_{name}']:
      return section[f'eval_{name}'], f'{prefix}.eval_{name}'
    return section[name], key
  raise ConfigError(
    key, f'has the splits {train_split!r} ({key}) and {eval_split!r} ({prefix}.eval_{name}); got {split!r}'
  )


def process_share(shards: list, process_index: int, process_count: int, key: str) -> list:
  """This process's shards: every `process_count`-th from `process_index`, so the shares are disjoint and their union
  is every shard. Raises `ConfigError(key, ...)` when there are fewer shards than processes."""
  if len(shards) < process_count:
    raise ConfigError(key, f'{len(shards)} shards for {process_count} processes: each process needs at least one')
  return shards[process_index::process_count]


def require_pyarrow():
  """`pyarrow.parquet` (the `parquet` extra), or a `UserError` naming the extra that installs it."""
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("data.name='parquet' needs pyarrow: pip install -e '.[parquet]'") from None
  return pq
