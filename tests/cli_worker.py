"""Runs one CLI's `main(argv)` many times in one long-lived process, so CLI tests pay the JAX import once.

  python tests/cli_worker.py train.py      # reads JSON argv lists on stdin, answers JSON lines on stdout

Each call runs with file descriptors 1 and 2 redirected to temporary files (so warnings printed by C++ or absl
logging are captured too) and answers `{"code", "stdout", "stderr"}` the way a fresh process would report them:
`SystemExit` gives its code, an uncaught exception gives code 1 and its traceback on stderr. Between calls the absl
flags are reset to their defaults and flags that `main` itself defined (eval/run.py defines its flags in main)
are removed, so one call never sees another's flags. One worker per CLI: the entry points define overlapping flags.
`CliWorker` is the test-side client.
"""

import importlib.util
import json
import os
import select
import subprocess
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(script: str):
  """Imports an entry-point file as a module (not as __main__, so it does not run); the packages it imports are
  installed (`pip install -e .`)."""
  name = 'cli_' + script.replace('/', '_').replace('.py', '')
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def _call(main, argv: list[str]) -> dict:
  """Runs main(argv) with fds 1 and 2 captured; returns the exit code and both streams."""
  from absl import flags

  before = set(flags.FLAGS)
  sys.argv = list(argv)  # ml_collections reads `--config.*` overrides from sys.argv.
  saved = os.dup(1), os.dup(2)
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
    try:
      main(argv)
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # pylint: disable=broad-except  # What the interpreter would print for an uncaught error.
      traceback.print_exc()
      code = 1
    finally:
      sys.stdout.flush(), sys.stderr.flush()
      os.dup2(saved[0], 1), os.dup2(saved[1], 2)
      os.close(saved[0]), os.close(saved[1])
    out.seek(0), err.seek(0)
    result = {'code': code, 'stdout': out.read(), 'stderr': err.read()}
  flags.FLAGS.unparse_flags()
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
  return result


def serve(script: str) -> None:
  """The worker loop: one JSON argv list per stdin line, one JSON result per stdout line."""
  os.chdir(ROOT)
  os.environ.update({'WANDB_MODE': 'disabled', 'JAX_PLATFORMS': 'cpu'})
  channel = os.fdopen(os.dup(1), 'w')
  main = _load(script).main
  channel.write('ready\n')
  channel.flush()
  for line in sys.stdin:
    channel.write(json.dumps(_call(main, [script, *json.loads(line)])) + '\n')
    channel.flush()


class CliWorker:
  """Test-side client: `CliWorker('sample.py').run('--workdir', W)` -> {'code', 'stdout', 'stderr'}."""

  def __init__(self, script: str, timeout: float = 300):
    env = {**os.environ, 'WANDB_MODE': 'disabled', 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
    self.script, self.timeout = script, timeout
    self.proc = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), script],
      cwd=ROOT,
      env=env,
      text=True,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
    )
    assert self._read() == 'ready', f'{script} worker did not start'

  def _read(self) -> str:
    ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
    if not ready:
      self.close()
      raise TimeoutError(f'{self.script} did not answer within {self.timeout} s')
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.script} worker died (exit {self.proc.wait()})')
    return line.strip()

  def run(self, *argv: str) -> dict:
    self.proc.stdin.write(json.dumps(list(argv)) + '\n')
    self.proc.stdin.flush()
    return json.loads(self._read())

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()


class WorkerPool:
  """Workers started on first use, one per CLI; `pool('sample.py').run(...)`; `close()` stops them all."""

  def __init__(self):
    self.workers: dict[str, CliWorker] = {}

  def __call__(self, script: str) -> CliWorker:
    if script not in self.workers:
      self.workers[script] = CliWorker(script)
    return self.workers[script]

  def close(self) -> None:
    for worker in self.workers.values():
      worker.close()


def assert_user_error(result: dict, *needles: str) -> str:
  """Exit code 2, exactly one `error: ...` line on stderr naming every needle, no traceback; returns the line."""
  stderr = result['stderr']
  assert result['code'] == 2, (result['code'], stderr[-3000:])
  lines = [l for l in stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


if __name__ == '__main__':
  serve(sys.argv[1])
