"""The error paths of the CLIs in one table: each bad invocation is exit code 2 with one `error: ...` line that
names the problem and no traceback; a damaged latest checkpoint met by sample.py is a warning and a fallback.

The CLIs run in-process in one worker per CLI (tests/cli_worker.py), on the session's tiny trained workdirs.
"""

import json
import os
import shutil

import pytest

from cli_worker import WorkerPool, assert_user_error

MISSING = '{tmp}/does/not/exist'

# (id, script, argv with {vae} / {ldm} / {tmp} placeholders, words the error line must contain)
# fmt: off
CASES = [
    ('train-missing-config', 'train.py', ['--config', '{tmp}/nope.py:tiny', '--workdir', '{tmp}/w'], ['No such file']),
    ('train-missing-vae-workdir', 'train.py', ['--config', 'configs/ldm_base.py:tiny', '--workdir', '{tmp}/w',
                                               '--config.vae_workdir=' + MISSING], ['not a training workdir']),
    ('train-ldm-as-vae-workdir', 'train.py', ['--config', 'configs/ldm_base.py:tiny', '--workdir', '{tmp}/w',
                                              '--config.vae_workdir={ldm}'], ["'ldm' model", "'vae'"]),
    ('train-unknown-sampler', 'train.py', ['--config', 'configs/ldm_base.py:tiny', '--workdir', '{tmp}/w',
                                           '--config.sample.sampler=magic'], ['sample.sampler', 'magic', 'ddim']),
    ('train-attention-the-backend-lacks', 'train.py', ['--config', 'configs/ldm_base.py:tiny', '--workdir', '{tmp}/w',
                                                       '--config.model.unet.attention=cudnn'],
     ['model.unet.attention', 'cudnn', 'GPU']),
    ('sample-missing-workdir', 'sample.py', ['--workdir', MISSING, '--prompt', 'a', '--out', '{tmp}/o'],
     ['does not exist']),
    ('sample-no-prompt', 'sample.py', ['--workdir', '{ldm}', '--out', '{tmp}/o'], ['no prompt']),
    ('sample-blank-prompts-file', 'sample.py', ['--workdir', '{ldm}', '--prompts_file', '{tmp}/blank.txt', '--out',
                                                '{tmp}/o'], ['no prompt']),
    ('sample-missing-prompts-file', 'sample.py', ['--workdir', '{ldm}', '--prompts_file', MISSING, '--out', '{tmp}/o'],
     ['prompts', 'No such file']),
    ('sample-unknown-sampler', 'sample.py', ['--workdir', '{ldm}', '--prompt', 'a', '--sampler', 'magic', '--out',
                                             '{tmp}/o'], ['magic', 'ddim']),
    ('sample-vae-workdir', 'sample.py', ['--workdir', '{vae}', '--prompt', 'a', '--out', '{tmp}/o'], ["'vae'"]),
    ('sample-missing-init-image', 'sample.py', ['--workdir', '{ldm}', '--prompt', 'a', '--init_image', MISSING,
                                                '--out', '{tmp}/o'], ['--init_image']),
    ('sample-outpaint-negative', 'sample.py', ['--workdir', MISSING, '--prompt', 'a', '--init_image', MISSING,
                                               '--outpaint=-8,0,0,0', '--out', '{tmp}/o'], ['--outpaint', '>= 0']),
    ('sample-outpaint-fraction', 'sample.py', ['--workdir', MISSING, '--prompt', 'a', '--init_image', MISSING,
                                               '--outpaint', '8.5,0,0,0', '--out', '{tmp}/o'],
     ['--outpaint', 'integer', '8.5,0,0,0']),
    ('sample-outpaint-three-values', 'sample.py', ['--workdir', MISSING, '--prompt', 'a', '--init_image', MISSING,
                                                   '--outpaint', '8,0,0', '--out', '{tmp}/o'],
     ['--outpaint', '4 comma-separated values']),
    ('sample-outpaint-nothing', 'sample.py', ['--workdir', MISSING, '--prompt', 'a', '--init_image', MISSING,
                                              '--outpaint', '0,0,0,0', '--out', '{tmp}/o'], ['--outpaint', '> 0']),
    ('sample-outpaint-blur', 'sample.py', ['--workdir', MISSING, '--prompt', 'a', '--init_image', MISSING,
                                           '--outpaint', '8,0,0,0', '--outpaint_blur=-1', '--out', '{tmp}/o'],
     ['--outpaint_blur', '>= 0']),
    ('sample-outpaint-without-init-image', 'sample.py', ['--workdir', MISSING, '--prompt', 'a', '--outpaint',
                                                         '8,0,0,0', '--out', '{tmp}/o'],
     ['--outpaint', 'needs an init image', '--init_image']),
    ('sample-outpaint-with-mask', 'sample.py', ['--workdir', MISSING, '--prompt', 'a', '--init_image', MISSING,
                                                '--mask', MISSING, '--outpaint', '8,0,0,0', '--out', '{tmp}/o'],
     ['--outpaint', '--mask', 'cannot be combined']),
    ('eval-missing-workdir', 'eval/run.py', ['--workdir', MISSING], ['does not exist']),
    ('eval-vae-workdir', 'eval/run.py', ['--workdir', '{vae}', '--metrics', 'oracle', '--num_samples', '2'],
     ["'vae'", "'ldm'"]),
    ('eval-blank-prompts-file', 'eval/run.py', ['--workdir', '{ldm}', '--metrics', 'oracle', '--num_samples', '2',
                                                '--prompts_file', '{tmp}/blank.txt'], ['no prompts']),
    ('eval-unknown-sampler', 'eval/run.py', ['--workdir', '{ldm}', '--sampler', 'magic'], ['magic', 'ddim']),
    ('eval-missing-step', 'eval/run.py', ['--workdir', '{ldm}', '--step', '999', '--metrics', 'oracle'],
     ['step 999']),
    ('convert-missing-source', 'scripts/convert.py', ['import', MISSING, '--workdir', '{tmp}/new'],
     ['does not exist']),
    ('convert-missing-workdir', 'scripts/convert.py', ['export', '{tmp}/out', '--workdir', MISSING],
     ['does not exist']),
    ('convert-vae-workdir', 'scripts/convert.py', ['export', '{tmp}/out', '--workdir', '{vae}'], ["'vae'", "'ldm'"]),
    (
      'convert-unknown-command',
      'scripts/convert.py',
      ['upgrade'],
      ['unknown command', "'upgrade'", 'export, export-lora, import'],
    ),
    ('convert-no-command', 'scripts/convert.py', [], ['required', 'command (export|export-lora|import)', '--workdir']),
    ('convert-no-source', 'scripts/convert.py', ['import', '--workdir', '{tmp}/new'], ['required: source']),
    ('convert-no-directory', 'scripts/convert.py', ['export', '--workdir', '{ldm}'], ['required: directory']),
    ('convert-no-workdir', 'scripts/convert.py', ['import', '{ldm}'], ['required: --workdir']),
    ('convert-extra-argument', 'scripts/convert.py', ['export', '{tmp}/out', 'more', '--workdir', '{ldm}'],
     ['unexpected argument', "'more'"]),
    ('convert-step-on-import', 'scripts/convert.py', ['import', MISSING, '--workdir', '{tmp}/new', '--step', '3'],
     ['--step', 'export']),
    ('convert-argparse-abbreviation', 'scripts/convert.py', ['export', '{tmp}/out', '--work', '{ldm}'],
     ['Unknown command line flag', 'work']),
    ('train-stray-argument', 'train.py', ['--config', 'configs/ldm_base.py:tiny', '--workdir', '{tmp}/w', 'lr=3'],
     ['unexpected argument', "'lr=3'"]),
    ('precompute-no-vae-workdir', 'scripts/precompute_latents.py', ['--out', '{tmp}/c'], ['--vae_workdir']),
    ('precompute-missing-vae-workdir', 'scripts/precompute_latents.py', ['--vae_workdir', MISSING, '--out', '{tmp}/c'],
     ['--vae_workdir', 'does not exist']),
    ('precompute-no-out', 'scripts/precompute_latents.py', ['--vae_workdir', '{vae}'], ['--out']),
    ('precompute-vae-config', 'scripts/precompute_latents.py', ['--vae_workdir', '{vae}', '--out', '{tmp}/c',
                                                                '--config', 'configs/vae_base.py:tiny'], ['stage-2']),
    ('precompute-process-index', 'scripts/precompute_latents.py', ['--vae_workdir', '{vae}', '--out', '{tmp}/c',
                                                                   '--process_index', '2', '--process_count', '2'],
     ['--process_index', '[0, --process_count)']),
    ('precompute-stray-argument', 'scripts/precompute_latents.py', ['{vae}', '--out', '{tmp}/c'],
     ['unexpected argument']),
    ('train-vae-negative-disc-start', 'train.py', ['--config', 'configs/vae_base.py:tiny', '--workdir', '{tmp}/w',
                                                   '--config.loss.disc_start=-1'],
     ['config.loss.disc_start', '>= 0', '-1']),
    ('train-vae-unknown-disc-loss', 'train.py', ['--config', 'configs/vae_base.py:tiny', '--workdir', '{tmp}/w',
                                                 '--config.loss.disc_loss=wasserstein'],
     ['config.loss.disc_loss', "'wasserstein'", 'hinge, vanilla']),
    ('train-vae-missing-vgg-weights', 'train.py', ['--config', 'configs/vae_base.py:tiny', '--workdir', '{tmp}/w',
                                                   '--config.loss.perceptual_weight=1',
                                                   '--config.loss.vgg_weights=' + MISSING,
                                                   '--config.loss.lpips_weights=random'],
     ['config.loss.vgg_weights', 'does not exist']),
    ('train-vae-missing-lpips-weights', 'train.py', ['--config', 'configs/vae_base.py:tiny', '--workdir', '{tmp}/w',
                                                     '--config.loss.perceptual_weight=1',
                                                     '--config.loss.vgg_weights=random',
                                                     '--config.loss.lpips_weights=' + MISSING],
     ['config.loss.lpips_weights', 'does not exist']),
    ('train-vae-mis-shaped-lpips-weights', 'train.py', ['--config', 'configs/vae_base.py:tiny', '--workdir', '{tmp}/w',
                                                        '--config.loss.perceptual_weight=1',
                                                        '--config.loss.vgg_weights=random',
                                                        '--config.loss.lpips_weights={tmp}/heads.pth'],
     ['config.loss.lpips_weights', 'lin3.model.1.weight', '(1, 256, 1, 1)', '(1, 512, 1, 1)']),
]
# fmt: on


@pytest.fixture(scope='module')
def workers():
  pool = WorkerPool()
  yield pool
  pool.close()


def _misshaped_lpips_heads(path: str) -> None:
  """The lpips package's vgg heads with lin3 of 256 channels (vgg's conv4 has 512)."""
  torch = pytest.importorskip('torch')
  heads = {f'lin{i}.model.1.weight': torch.zeros(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
  heads['lin3.model.1.weight'] = torch.zeros(1, 256, 1, 1)
  torch.save(heads, path)


@pytest.mark.parametrize('script,argv,needles', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_error_table(workers, tmp_path, request, script, argv, needles):
  (tmp_path / 'blank.txt').write_text('\n  \n\t\n')
  if '{tmp}/heads.pth' in ' '.join(argv):
    _misshaped_lpips_heads(str(tmp_path / 'heads.pth'))
  values = {'tmp': str(tmp_path)}
  for name in ('vae', 'ldm'):  # The trained workdirs only for the cases that name them.
    if any(f'{{{name}}}' in a for a in argv):
      values[name] = request.getfixturevalue(f'{name}_workdir')
  result = workers(script).run(*[a.format(**values) for a in argv])
  assert_user_error(result, *needles)
  assert not os.path.exists(tmp_path / 'o'), 'nothing is written on an error'


def test_sample_falls_back_past_a_damaged_checkpoint(workers, tmp_path, ldm_workdir):
  """A truncated latest checkpoint: sample.py warns, names it, samples from the previous step and exits 0."""
  workdir = str(tmp_path / 'ldm')
  shutil.copytree(ldm_workdir, workdir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert len(steps) >= 2, steps
  damaged = 0
  for root, _, files in os.walk(os.path.join(workdir, 'checkpoints', str(steps[-1]), 'state')):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 8:
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)
        damaged += 1
  assert damaged
  result = workers('sample.py').run(
    '--workdir',
    workdir,
    '--prompt',
    'a red circle',
    '--num_steps',
    '1',
    '--sampler',
    'ddim',
    '--out',
    str(tmp_path / 'o'),
  )
  assert result['code'] == 0, result['stderr'][-3000:]
  warnings = [l for l in result['stderr'].splitlines() if l.startswith('warning: checkpoint')]
  assert len(warnings) == 1 and 'damaged' in warnings[0] and f'/{steps[-1]}' in warnings[0], result['stderr'][-2000:]
  assert 'Traceback' not in result['stderr']
  settings = json.load(open(tmp_path / 'o' / 'settings.json'))
  assert settings['step'] == steps[-2]
  assert os.path.exists(tmp_path / 'o' / '0000.png')
