"""Property-based: random bad flags and config overrides to every CLI give exit code 2, one `error: ...` line naming
the problem, and no traceback.

Each CLI's `main` runs in one long-lived worker process per CLI (tests/cli_worker.py), so an example costs
milliseconds instead of a JAX import. The default run draws a few dozen examples per CLI; `-m slow` draws more.
Generated values are bad by the framework's documented rules, so a case that trains, samples or converts is a bug.
"""

import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_worker import CliWorker, WorkerPool, assert_user_error

FEW = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
MANY = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
SAMPLERS = ('ddim', 'ddpm', 'dpmpp_2m', 'dpmpp_2m_sde', 'euler', 'euler_a', 'flow_euler', 'flow_heun', 'heun', 'lcm')

# Anything a user could type, NUL excepted (argv cannot hold it).
garbage = st.text(st.characters(blacklist_characters='\x00', blacklist_categories=('Cs',)), max_size=12)
words = st.text(string.ascii_letters + string.digits + '_-. /', min_size=1, max_size=12)


def _parses_as_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    try:
      int(text, 0)
      return True
    except ValueError:
      return False


not_a_number = garbage.filter(lambda s: not _parses_as_number(s.strip()))
non_positive_int = st.integers(max_value=0)
negative_float = st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=True)


def missing_path(tmp: str):
  return words.map(lambda w: os.path.join(tmp, 'missing', w.strip('/ ') or 'x'))


# --- train.py: --config.KEY=VALUE overrides, each a (value strategy, needle the error must name) ------------------

TRAIN_BAD = {
  'train.num_steps': non_positive_int,
  'train.batch_size': non_positive_int,
  'train.checkpoint_every': non_positive_int,
  'train.log_every': non_positive_int,
  'train.eval_every': st.integers(max_value=-1),
  'optim.warmup_steps': st.integers(max_value=-1),
  'optim.lr': st.one_of(st.floats(max_value=0.0, allow_nan=False), st.sampled_from([float('nan'), float('inf')])),
  'optim.weight_decay': negative_float,
  'sample.guidance_scale': negative_float,
  'sample.num_steps': st.one_of(non_positive_int, st.integers(min_value=1001, max_value=10**6)),
  'diffusion.caption_dropout': st.one_of(st.floats(min_value=1.0, allow_nan=False), negative_float),
  'sample.sampler': garbage.filter(lambda s: s not in SAMPLERS),
  'diffusion.prediction_type': garbage.filter(lambda s: s not in ('eps', 'x0', 'v', 'flow')),
  'wandb.mode': garbage.filter(lambda s: s not in ('online', 'offline', 'disabled')),
  'mesh.data': st.one_of(st.just(0), st.integers(max_value=-2)),
}
TYPED_KEYS = (
  'train.num_steps',
  'train.batch_size',
  'optim.lr',
  'optim.ema_decay',
  'sample.guidance_scale',
  'data.image_size',
  'seed',
  'mesh.fsdp',
)


@st.composite
def train_cases(draw, tmp: str) -> tuple[list[str], list[str]]:
  """(argv, needles): a valid command with exactly one thing wrong."""
  config, workdir = 'configs/ldm_base.py:tiny', os.path.join(tmp, 'w')
  kind = draw(
    st.sampled_from(
      ['bad_value', 'garbage', 'unknown_key', 'no_workdir', 'no_config', 'missing_file', 'unknown_preset']
    )
  )
  if kind == 'bad_value':
    key = draw(st.sampled_from(sorted(TRAIN_BAD)))
    return ['--config', config, '--workdir', workdir, f'--config.{key}={draw(TRAIN_BAD[key])}'], [key]
  if kind == 'garbage':
    key = draw(st.sampled_from(TYPED_KEYS))
    return ['--config', config, '--workdir', workdir, f'--config.{key}={draw(not_a_number)}'], [key]
  if kind == 'unknown_key':
    key = draw(st.from_regex(r'[a-z]{3,8}\.[a-z_]{3,10}', fullmatch=True))
    return ['--config', config, '--workdir', workdir, f'--config.zz{key}=1'], ['zz' + key.split('.')[0]]
  if kind == 'no_workdir':
    return ['--config', config], ['--workdir']
  if kind == 'no_config':
    return ['--workdir', workdir], ['--config']
  if kind == 'missing_file':
    path = draw(missing_path(tmp)) + '.py'
    return ['--config', f'{path}:tiny', '--workdir', workdir], ['--config', 'No such file']
  preset = draw(words.filter(lambda w: w not in ('base', 'tiny', 'sd15') and ':' not in w))
  return ['--config', f'configs/ldm_base.py:{preset}', '--workdir', workdir], ['preset']


# --- sample.py ------------------------------------------------------------------------------------------------------


@st.composite
def sample_cases(draw, workdir: str, tmp: str) -> tuple[list[str], list[str]]:
  out = ['--out', os.path.join(tmp, 'out')]
  base = ['--workdir', workdir, '--prompt', 'a red circle', *out]
  kind = draw(
    st.sampled_from(
      ['number', 'garbage', 'sampler', 'no_prompt', 'blank_prompts', 'missing_workdir', 'missing_image', 'interval']
    )
  )
  if kind == 'number':
    flag, value = draw(
      st.sampled_from(
        [
          ('num_images', non_positive_int),
          ('batch_size', non_positive_int),
          ('num_steps', non_positive_int),
          ('guidance_scale', negative_float),
          ('eta', negative_float),
          ('guidance_rescale', st.floats(min_value=1.001)),
          ('strength', st.one_of(st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.001))),
        ]
      )
    )
    return [*base, f'--{flag}={draw(value)}'], [f'--{flag}']
  if kind == 'garbage':
    flag = draw(st.sampled_from(['num_images', 'seed', 'num_steps', 'guidance_scale', 'batch_size', 'strength']))
    return [*base, f'--{flag}={draw(not_a_number)}'], [flag]
  if kind == 'sampler':
    return [*base, f'--sampler={draw(garbage.filter(lambda s: s not in SAMPLERS))}'], ['unknown sampler']
  if kind == 'no_prompt':
    return ['--workdir', workdir, *out], ['no prompt']
  if kind == 'blank_prompts':
    path = os.path.join(tmp, 'blank_prompts.txt')
    with open(path, 'w') as f:
      f.write(draw(st.text(' \t\n\r', max_size=8)))
    return ['--workdir', workdir, '--prompts_file', path, *out], ['no prompt']
  if kind == 'missing_workdir':
    return ['--workdir', draw(missing_path(tmp)), '--prompt', 'a', *out], ['does not exist']
  if kind == 'missing_image':
    return [*base, f'--init_image={draw(missing_path(tmp))}'], ['--init_image', 'does not exist']
  interval = draw(
    garbage.filter(lambda s: s.count(',') != 1)
    | st.tuples(st.floats(1.01, 10), st.floats(0, 1)).map(lambda t: f'{t[0]},{t[1]}')
  )
  return [*base, f'--guidance_interval={interval}'], ['--guidance_interval']


# --- eval/run.py ----------------------------------------------------------------------------------------------------


@st.composite
def eval_cases(draw, workdir: str, tmp: str) -> tuple[list[str], list[str]]:
  kind = draw(
    st.sampled_from(
      ['num_samples', 'batch_size', 'metric', 'sampler', 'garbage', 'missing_workdir', 'no_workdir', 'wandb_mode']
    )
  )
  base = ['--workdir', workdir]
  if kind == 'num_samples':
    return [*base, f'--num_samples={draw(st.integers(max_value=1))}'], ['--num_samples']
  if kind == 'batch_size':
    return [*base, f'--batch_size={draw(non_positive_int)}'], ['--batch_size']
  if kind == 'metric':
    name = draw(
      st.text(string.ascii_letters + '_', min_size=1, max_size=10).filter(lambda s: s not in ('fid', 'oracle', 'clip'))
    )
    return [*base, f'--metrics=fid,{name}'], ['unknown metric', name]
  if kind == 'sampler':
    return [*base, f'--sampler={draw(garbage.filter(lambda s: s not in SAMPLERS))}'], ['unknown sampler']
  if kind == 'garbage':
    flag = draw(st.sampled_from(['num_samples', 'step', 'batch_size', 'poll_seconds', 'seed']))
    return [*base, f'--{flag}={draw(not_a_number)}'], [flag]
  if kind == 'missing_workdir':
    return ['--workdir', draw(missing_path(tmp))], ['does not exist']
  if kind == 'no_workdir':
    return [], ['--workdir']
  return [*base, f'--wandb_mode={draw(garbage.filter(lambda s: s not in ("online", "offline", "disabled")))}'], [
    'wandb_mode'
  ]


# --- scripts/convert.py ---------------------------------------------------------------------------------------------


@st.composite
def convert_cases(draw, workdir: str, tmp: str) -> tuple[list[str], list[str]]:
  kind = draw(
    st.sampled_from(
      [
        'command',
        'no_command',
        'no_path',
        'extra',
        'import_missing',
        'export_missing',
        'step',
        'no_workdir',
        'export_flag_on_import',
      ]
    )
  )
  if kind == 'command':
    command = draw(words.filter(lambda w: w not in ('import', 'export') and not w.startswith('-')))
    return [command], ['unknown command', 'export, export-lora, import']
  if kind == 'no_command':
    return [], ['command']
  if kind == 'no_path':
    command = draw(st.sampled_from(['import', 'export']))
    return [command, '--workdir', workdir], ['required', {'import': 'source', 'export': 'directory'}[command]]
  if kind == 'extra':
    extra = draw(words.filter(lambda w: not w.startswith('-')))
    return ['export', os.path.join(tmp, 'o'), extra, '--workdir', workdir], ['unexpected argument']
  if kind == 'import_missing':
    return ['import', draw(missing_path(tmp)), '--workdir', os.path.join(tmp, 'new')], ['does not exist']
  if kind == 'export_missing':
    return ['export', os.path.join(tmp, 'o'), '--workdir', draw(missing_path(tmp))], ['does not exist']
  if kind == 'step':
    return ['export', os.path.join(tmp, 'o'), '--workdir', workdir, f'--step={draw(not_a_number)}'], ['--step']
  if kind == 'export_flag_on_import':
    flag = draw(st.sampled_from(['--step=3', '--raw_params']))
    return ['import', draw(missing_path(tmp)), '--workdir', os.path.join(tmp, 'new'), flag], ['export']
  return ['export', os.path.join(tmp, 'o')], ['--workdir']


# --- scripts/precompute_latents.py ----------------------------------------------------------------------------------


@st.composite
def precompute_cases(draw, vae_workdir: str, tmp: str) -> tuple[list[str], list[str]]:
  base = ['--vae_workdir', vae_workdir, '--out', os.path.join(tmp, 'cache')]
  kind = draw(st.sampled_from(['batch_size', 'garbage', 'missing_vae', 'process', 'half_process', 'flips', 'stray']))
  if kind == 'batch_size':
    return [*base, f'--batch_size={draw(non_positive_int)}'], ['--batch_size']
  if kind == 'garbage':
    flag = draw(st.sampled_from(['batch_size', 'process_index', 'process_count']))
    return [*base, f'--{flag}={draw(not_a_number)}'], [flag]
  if kind == 'missing_vae':
    return ['--vae_workdir', draw(missing_path(tmp)), '--out', os.path.join(tmp, 'cache')], ['does not exist']
  if kind == 'process':
    count = draw(st.integers(min_value=1, max_value=8))
    index = draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=count)))
    return [*base, f'--process_index={index}', f'--process_count={count}'], ['--process_index']
  if kind == 'half_process':
    flag = draw(st.sampled_from(['process_index', 'process_count']))
    return [*base, f'--{flag}=0'], ['go together']
  if kind == 'flips':
    return [*base, f'--flips={draw(garbage.filter(lambda s: s not in ("auto", "both", "none")))}'], ['flips']
  return [*base, draw(words.filter(lambda w: not w.startswith('-')))], ['unexpected argument']


@pytest.fixture(scope='module')
def workers():
  """One worker per CLI, started on first use and shared by this module's tests."""
  pool = WorkerPool()
  yield pool
  pool.close()


def _check(worker: CliWorker, case: tuple[list[str], list[str]]) -> None:
  argv, needles = case
  result = worker.run(*argv)
  assert_user_error(result, *needles)


@pytest.fixture(scope='module')
def tmp(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('cli_properties'))


@FEW
@given(data=st.data())
def test_train_bad_flags(workers, tmp, data):
  _check(workers('train.py'), data.draw(train_cases(tmp)))


@FEW
@given(data=st.data())
def test_sample_bad_flags(workers, tmp, ldm_workdir, data):
  _check(workers('sample.py'), data.draw(sample_cases(ldm_workdir, tmp)))


@FEW
@given(data=st.data())
def test_eval_bad_flags(workers, tmp, ldm_workdir, data):
  _check(workers('eval/run.py'), data.draw(eval_cases(ldm_workdir, tmp)))


@FEW
@given(data=st.data())
def test_convert_bad_arguments(workers, tmp, ldm_workdir, data):
  _check(workers('scripts/convert.py'), data.draw(convert_cases(ldm_workdir, tmp)))


@FEW
@given(data=st.data())
def test_precompute_bad_flags(workers, tmp, vae_workdir, data):
  _check(workers('scripts/precompute_latents.py'), data.draw(precompute_cases(vae_workdir, tmp)))


@pytest.mark.slow
@MANY
@given(data=st.data())
def test_all_clis_bad_flags_many(workers, tmp, vae_workdir, ldm_workdir, data):
  cases = {
    'train.py': train_cases(tmp),
    'sample.py': sample_cases(ldm_workdir, tmp),
    'eval/run.py': eval_cases(ldm_workdir, tmp),
    'scripts/convert.py': convert_cases(ldm_workdir, tmp),
    'scripts/precompute_latents.py': precompute_cases(vae_workdir, tmp),
  }
  script = data.draw(st.sampled_from(sorted(cases)))
  _check(workers(script), data.draw(cases[script]))
