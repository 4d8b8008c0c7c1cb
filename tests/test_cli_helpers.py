"""diffusion.cli's helpers in-process: positional arguments and subcommands, required flags, old spellings, --help,
comma lists, one value per repeated flag and DIR[:SCALE] values."""

import math

import pytest
from absl import flags
from hypothesis import given
from hypothesis import strategies as st

from diffusion import cli
from diffusion.errors import UserError


@pytest.fixture
def define():
  """Defines flags on the global FLAGS for one test (as a tool does) and removes them afterwards."""
  before = set(flags.FLAGS)
  yield flags
  flags.FLAGS.unparse_flags()
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)


def test_positional_arguments_are_counted(define):
  assert cli.parse_flags(['fid', 'a', 'b'], None, positional=('PATH1', 'PATH2')) == ['a', 'b']
  with pytest.raises(UserError, match=r'required: PATH2 \(see --help\)'):
    cli.parse_flags(['fid', 'a'], None, positional=('PATH1', 'PATH2'))
  with pytest.raises(UserError, match="unexpected argument.*'c'"):
    cli.parse_flags(['fid', 'a', 'b', 'c'], None, positional=('PATH1', 'PATH2'))
  with pytest.raises(UserError, match="unexpected argument.*'stray'"):
    cli.parse_flags(['tool', 'stray'], None)


def test_each_parse_starts_from_the_defaults(define):
  define.DEFINE_string('cli_workdir', None, 'w')
  define.DEFINE_multi_string('cli_lora', [], 'Adapters.')
  cli.parse_flags(['tool', '--cli_workdir=W', '--cli_lora=a'], None)
  assert (define.FLAGS.cli_workdir, define.FLAGS.cli_lora) == ('W', ['a'])
  cli.parse_flags(['tool', '--cli_lora=b'], None)
  assert (define.FLAGS.cli_workdir, define.FLAGS.cli_lora) == (None, ['b'])


def test_a_last_name_with_dots_takes_the_rest(define):
  assert cli.parse_flags(['soak'], None, positional=('OVERRIDE...',)) == []
  assert cli.parse_flags(['soak', '--', '--config.a=1', 'x'], None, positional=('OVERRIDE...',)) == [
    '--config.a=1',
    'x',
  ]
  with pytest.raises(UserError, match='required: SRC'):
    cli.parse_flags(['t'], None, positional=('SRC', 'MORE...'))


def test_commands_are_checked_and_take_their_own_arguments(define):
  define.DEFINE_string('cli_workdir', None, 'w')
  commands = {'import': ('source',), 'export': ('directory',)}
  argv = ['convert.py', 'export', '--cli_workdir', 'W', 'OUT']
  assert cli.parse_flags(argv, None, commands=commands, required=('cli_workdir',)) == ['export', 'OUT']
  with pytest.raises(UserError, match="unknown command 'upgrade'; known: export, import"):
    cli.parse_flags(['convert.py', 'upgrade', 'x'], None, commands=commands)
  with pytest.raises(UserError, match=r'required: source, --cli_workdir \(see --help\)'):
    cli.parse_flags(['convert.py', 'import'], None, commands=commands, required=('cli_workdir',))
  with pytest.raises(UserError, match=r'required: command \(export\|import\), --cli_workdir'):
    cli.parse_flags(['convert.py'], None, commands=commands, required=('cli_workdir',))
  with pytest.raises(UserError, match="unexpected argument.*'extra'"):
    cli.parse_flags(['convert.py', 'import', 'a', 'extra', '--cli_workdir=W'], None, commands=commands)


def test_an_old_spelling_with_a_hyphen_sets_the_flag(define):
  define.DEFINE_integer('cli_batch_size', 50, 'Images per batch.')
  define.DEFINE_bool('cli_save_stats', False, 'Save.')
  define.DEFINE_multi_string('cli_lora', [], 'Adapters.')
  cli.alias('cli-batch-size', 'cli_batch_size')
  cli.alias('cli-save-stats', 'cli_save_stats')
  cli.alias('cli-lora-dir', 'cli_lora')
  cli.parse_flags(['fid', '--cli-batch-size=8', '--cli-save-stats', '--cli_lora=a', '--cli-lora-dir', 'b'], None)
  assert define.FLAGS.cli_batch_size == 8 and define.FLAGS.cli_save_stats
  assert define.FLAGS.cli_lora == ['a', 'b']  # One value per use, whichever spelling.
  cli.parse_flags(['fid', '--cli_batch_size', '9', '--nocli-save-stats'], None)
  assert define.FLAGS.cli_batch_size == 9 and not define.FLAGS.cli_save_stats
  with pytest.raises(UserError, match='--cli_batch_size=x'):
    cli.parse_flags(['fid', '--cli-batch-size=x'], None)


def test_help_prints_the_doc_and_the_flags_and_exits_0(define, capsys):
  define.DEFINE_integer('cli_steps', 7, 'Sampling steps.')
  define.DEFINE_bool('cli_raw', False, 'Raw params.')
  for flag in ('--help', '-h'):
    with pytest.raises(SystemExit) as exit_info:
      cli.parse_flags(
        ['tool', 'x', flag, '--cli_steps=bad'], None, positional=('A', 'B'), doc='Does a thing.\n\n  tool A B'
      )
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('Does a thing.\n\n  tool A B\n\nFlags:\n')
    assert '  --cli_steps: Sampling steps. (default: 7)' in out and '  --[no]cli_raw: Raw params.' in out
    assert '--verbosity' not in out  # absl's logging flags are not the tool's.
  assert cli.parse_flags(['tool', '--', '--help'], None, positional=('A',)) == ['--help']


@pytest.mark.parametrize(
  'text,kind,minimum,length,expected',
  [
    ('1,3,7', float, 0, None, [1.0, 3.0, 7.0]),
    ('25', int, 1, None, [25]),
    (' 10 , 20', int, 1, None, [10, 20]),
    ('a,b', str, None, None, ['a', 'b']),
    ('0.2,0.8', float, 0, 2, [0.2, 0.8]),
  ],
)
def test_comma_list_values(define, text, kind, minimum, length, expected):
  holder = define.DEFINE_string('cli_list', None, 'A comma list.')
  cli.parse_flags(['tool', f'--cli_list={text}'], None)
  assert cli.comma_list(holder, kind, minimum=minimum, length=length) == expected


@pytest.mark.parametrize(
  'text,kind,minimum,length,needle',
  [
    ('1,x', float, 0, None, 'a number >= 0 or a comma list'),
    ('', int, 1, None, 'an integer >= 1'),
    ('3,0', int, 1, None, "got '3,0'"),
    ('1,,2', float, None, None, 'a float'),
    ('0.1', float, 0, 2, '2 comma-separated values'),
  ],
)
def test_comma_list_errors_name_the_flag(define, text, kind, minimum, length, needle):
  holder = define.DEFINE_string('cli_list', None, 'A comma list.')
  cli.parse_flags(['tool', f'--cli_list={text}'], None)
  with pytest.raises(UserError, match='--cli_list must be') as error:
    cli.comma_list(holder, kind, minimum=minimum, length=length)
  assert needle in str(error.value)


def test_comma_list_of_an_unset_flag_is_none(define):
  holder = define.DEFINE_string('cli_list', None, 'A comma list.')
  cli.parse_flags(['tool'], None)
  assert cli.comma_list(holder, float) is None


def test_one_value_per_use_of_a_repeated_flag():
  assert cli.one_per([], ['a', 'b'], 'lora_scale', 'lora', 1.0) == [1.0, 1.0]
  assert cli.one_per([0.5, 2.0], ['a', 'b'], 'lora_scale', 'lora', 1.0) == [0.5, 2.0]
  with pytest.raises(UserError, match='--lora_scale is given 1 time.* but --lora 2: give one --lora_scale per --lora'):
    cli.one_per([0.5], ['a', 'b'], 'lora_scale', 'lora', 1.0)


@pytest.mark.parametrize(
  'text,expected',
  [
    ('dir:0.8', ('dir', 0.8)),
    ('dir', ('dir', None)),
    ('dir:-1', ('dir', -1.0)),
    ('dir:1e-3', ('dir', 1e-3)),
    ('dir:.5', ('dir', 0.5)),
    ('a:b:2', ('a:b', 2.0)),
    ('gs://bucket/dir', ('gs://bucket/dir', None)),
    ('gs://bucket/dir:0.5', ('gs://bucket/dir', 0.5)),
    ('C:\\dir', ('C:\\dir', None)),
    ('C:\\dir:1', ('C:\\dir', 1.0)),
    ('dir:', ('dir:', None)),
    ('dir:nan', ('dir:nan', None)),
    ('dir:inf', ('dir:inf', None)),
    ('dir:1_0', ('dir:1_0', None)),
    ('dir: 0.5', ('dir: 0.5', None)),
  ],
)
def test_path_and_scale(text, expected):
  assert cli.path_and_scale(text) == expected


def test_path_and_scale_default_and_errors():
  assert cli.path_and_scale('gs://b/d', default=1.0) == ('gs://b/d', 1.0)
  with pytest.raises(UserError, match='no path'):
    cli.path_and_scale(':0.5')


paths = st.text(st.characters(blacklist_categories=('Cs',)), min_size=1, max_size=20).filter(
  lambda p: cli.path_and_scale(p)[1] is None
)


@given(path=paths, scale=st.floats(allow_nan=False, allow_infinity=False))
def test_path_and_scale_round_trips(path, scale):
  """Any path that is not itself PATH:NUMBER comes back whole, alone or with any finite scale appended."""
  assert cli.path_and_scale(path, default=2.0) == (path, 2.0)
  got_path, got_scale = cli.path_and_scale(f'{path}:{scale!r}')
  assert got_path == path and math.isclose(got_scale, scale) and got_scale == scale
