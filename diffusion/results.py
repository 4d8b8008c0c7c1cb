"""Records of measured numbers: the JSON files under docs/results/ that every number in the docs comes from.

A record holds the numbers and everything needed to judge and rerun them: the exact command, the git commit (and
whether the tree had uncommitted changes), package versions, the devices, the machine and its load average at the
start and end of the measurement. The benchmark scripts and `make demo` write records with `write_record`; the
docs are generated from them by `scripts/make_docs.py`, so no number is typed in by hand.

Imports only jax and the standard library, so a bare accelerator machine can write records.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

import jax

# Packages whose versions go into every record (those installed; the rest are left out).
PACKAGES = (
  'jax',
  'jaxlib',
  'flax',
  'optax',
  'orbax-checkpoint',
  'grain',
  'numpy',
  'ml_collections',
  'torch',
  'diffusers',
  'transformers',
  'pytorch-fid',
)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, 'docs', 'results')


def load_average() -> float:
  """The 1-minute load average (how busy the machine was: shared machines slow every number down)."""
  return round(os.getloadavg()[0], 2)


def git_state(root: str = REPO_ROOT) -> dict[str, Any]:
  """The commit checked out at `root` and whether tracked files differ from it; 'unknown' outside a git tree."""

  def git(*args: str) -> str:
    return subprocess.run(['git', *args], cwd=root, capture_output=True, text=True, check=True, timeout=30).stdout

  try:
    commit = git('rev-parse', 'HEAD').strip()
    dirty = bool(git('status', '--porcelain', '--untracked-files=no').strip())
  except (OSError, subprocess.SubprocessError):
    return {'commit': 'unknown', 'dirty': None}
  return {'commit': commit, 'dirty': dirty}


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
  """Installed versions of `packages` (missing ones are left out)."""
  versions = {'python': platform.python_version()}
  for name in packages:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def machine() -> dict[str, Any]:
  """The host and the JAX devices this process sees."""
  devices = jax.devices()
  return {
    'platform': platform.platform(),
    'processor': platform.machine(),
    'cpu_count': os.cpu_count(),
    'jax_backend': jax.default_backend(),
    'device_kind': devices[0].device_kind,
    'device_count': len(devices),
    'process_count': jax.process_count(),
  }


def this_command() -> str:
  """The command line of this process, as it would be typed from the repository root."""
  script = sys.argv[0]
  if os.path.isabs(script) and script.startswith(REPO_ROOT + os.sep):
    script = os.path.relpath(script, REPO_ROOT)
  return shlex.join(['python', script, *sys.argv[1:]])


def make_record(
  name: str,
  results: Any,
  *,
  command: str | None = None,
  load_at_start: float | None = None,
  settings: dict | None = None,
  **extra: Any,
) -> dict[str, Any]:
  """A record of `results` (JSON-serialisable numbers) measured by `command` (default: this process's).

  `load_at_start` is the load average when the measurement began (`load_average()`); the load at the end is taken
  now. `settings` are the options the numbers depend on; `extra` keys go into the record as they are.
  """
  return {
    'name': name,
    'created_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
    'command': command or this_command(),
    'git': git_state(),
    'packages': package_versions(),
    'machine': machine(),
    'load_average': {'start': load_at_start, 'end': load_average()},
    'settings': settings or {},
    **extra,
    'results': results,
  }


def record_path(name: str, directory: str = RESULTS_DIR) -> str:
  """docs/results/<name>.json (or `name` itself when it is a path ending in .json)."""
  return name if name.endswith('.json') else os.path.join(directory, f'{name}.json')


def write_record(name: str, results: Any, *, path: str | None = None, **kwargs: Any) -> str:
  """Writes `make_record(name, results, **kwargs)` to `path` (default docs/results/<name>.json); returns the path."""
  path = path or record_path(name)
  record = make_record(name, results, **kwargs)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(record, f, indent=2, sort_keys=False)
    f.write('\n')
  print(f'wrote record {path}', flush=True)
  return path


def read_record(name: str, directory: str = RESULTS_DIR) -> dict[str, Any] | None:
  """The record docs/results/<name>.json, or None if there is none."""
  path = record_path(name, directory)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
