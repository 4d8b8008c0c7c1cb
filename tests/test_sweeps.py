"""W&B sweep files run as-is: expand each grid locally and run every command the agent would run, for 2 steps."""

import glob
import itertools
import json
import os
import subprocess
import sys

import pytest
import yaml

from support import LDM, ROOT, cli_overrides

SWEEPS = sorted(glob.glob(os.path.join(ROOT, 'configs', 'sweeps', '*.yaml')))


def agent_commands(sweep: dict) -> list[tuple[dict, list[str]]]:
  """(params, argv) per grid point, built by wandb's own agent helpers as `wandb agent` does."""
  from wandb.sdk.launch.sweeps import utils as sweep_utils

  assert sweep['method'] == 'grid'
  names = list(sweep['parameters'])
  grids = [sweep['parameters'][n]['values'] for n in names]
  commands = []
  for values in itertools.product(*grids):
    params = dict(zip(names, values))
    variables = sweep_utils.create_sweep_command_args({'args': {k: {'value': v} for k, v in params.items()}})
    variables.update(env=[], interpreter=[sys.executable], program=[sweep['program']])
    argv = []
    for part in sweep_utils.create_sweep_command(sweep['command']):
      part = str(part)
      argv += variables.get(part[2:-1], []) if part.startswith('${') and part.endswith('}') else [part]
    commands.append((params, argv))
  return commands


def test_there_is_a_sweep():
  assert SWEEPS


@pytest.mark.parametrize('every', [False, pytest.param(True, marks=pytest.mark.slow)], ids=['first-last', 'all'])
@pytest.mark.parametrize('path', SWEEPS, ids=os.path.basename)
def test_sweep_grid_runs(path, every, tmp_path, data_dir, vae_workdir):
  """The first and the last command of each grid (every value of every parameter in a grid of two-value axes);
  with -m slow, every command."""
  sweep = yaml.safe_load(open(path))
  commands = agent_commands(sweep)
  assert len(commands) >= 2
  if not every:
    commands = [commands[0], commands[-1]]
  test_overrides = cli_overrides(
    {**LDM, 'data.data_dir': data_dir, 'vae_workdir': vae_workdir, 'train.sample_every': 0, 'wandb.mode': 'offline'}
  )
  for i, (params, argv) in enumerate(commands):
    env = {**os.environ, 'WANDB_RUN_ID': f'sweeptest{i}', 'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path)}
    cwd_workdirs = os.path.join(str(tmp_path), 'runs')
    argv = [a.replace('workdirs/sweeps', cwd_workdirs) for a in argv]
    # The sweep's own arguments come after the test's size overrides, as the agent appends ${args} last.
    args_at = argv.index(next(a for a in argv if a.startswith('--' + next(iter(params)))))
    argv = argv[:args_at] + test_overrides + argv[args_at:]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    workdir = os.path.join(cwd_workdirs, f'sweeptest{i}')
    saved = json.load(open(os.path.join(workdir, 'config.json')))
    for key, value in params.items():
      node = saved
      for part in key.split('.')[1:]:
        node = node[part]
      assert node == value, key
    steps = [json.loads(l)['step'] for l in open(os.path.join(workdir, 'metrics.jsonl')) if 'loss' in l]
    assert steps[-1] == 2
