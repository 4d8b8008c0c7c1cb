r"""The evaluation job: samples each checkpoint of a stage-2 workdir and scores the samples (or, for a VAE workdir,
scores its reconstructions of held-out images).

  python eval/run.py --workdir W --metrics fid,oracle --num_samples 1000 [--step S] [--watch]
  python -m eval.run --workdir W --metrics fid --inception_weights pt_inception-2015-12-05-6726825d.pth
  python eval/run.py --workdir W --metrics fid,clip --clip_model CLIP_DIR   # CLIP score
  python eval/run.py --workdir VAE_W --metrics psnr,ssim,lpips,rfid --vgg_weights F --lpips_weights F
  python eval/run.py --workdir W            # the evaluators of the workdir's config (config.evals), if any

The flags build an evals spec (`diffusion.evaluation.spec`: one evaluator per metric, on the same samples); without
--metrics the workdir config's `config.evals` is used, with the given flags overriding each evaluator. For each
checkpoint (EMA params), the suite (`diffusion.evaluation.EvalSuite`) generates N images from fixed seeds (image i
starts from fold_in(seed, i); a `prompt<TAB>seed` line of --prompts_file fixes that prompt's noise as in sample.py) with
prompts from --prompts_file or the captions of the reference split, each process its share, then writes
`<workdir>/eval/<step>.json` and logs to W&B (offline by default, under `<workdir>/eval/wandb`; its own run, so it never
collides with the training run). Steps that already have a JSON file are skipped, so a killed job restarts where it
stopped; --watch keeps following a training run, evaluating each new checkpoint once, until the final step is done or no
checkpoint has appeared for --idle_timeout seconds. Without --inception_weights, FID uses a
random Inception network and is reported as `fid_random_inception`.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from typing import Sequence

import ml_collections
from absl import flags

from diffusion import cli
from diffusion.errors import UserError, user_errors_exit


def eval_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, 'eval', f'{step}.json')


def checkpoint_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps, read fresh from disk (a running training job adds more)."""
  from diffusion import checkpoint

  return sorted(checkpoint.Checkpointer(workdir, read_only=True).all_steps())


def _entry(
  num_samples: int | None = None,
  *,
  prompts_file: str | None = None,
  split: str | None = None,
  num_reference: int | None = None,
  seed: int | None = None,
  sampling: dict | None = None,
  batch_size: int | None = None,
  inception_weights: str | None = None,
  metric_options: dict | None = None,
) -> dict:
  """The evaluator settings given as arguments (None: not given)."""
  entry = {
    'num_samples': num_samples,
    'prompts_file': prompts_file,
    'split': split,
    'num_reference': num_reference,
    'seed': seed,
    'batch_size': batch_size,
    'inception_weights': inception_weights,
    **(sampling or {}),
    **(metric_options or {}),
  }
  return {k: v for k, v in entry.items() if v is not None}


def evals_spec(metric_names: Sequence[str], num_samples: int, **kwargs) -> ml_collections.ConfigDict:
  """A `config.evals` section with one evaluator per metric, all on the same samples (so generated once)."""
  entry = _entry(num_samples, **kwargs)
  return ml_collections.ConfigDict({name: {'type': name, **entry} for name in metric_names})


class Evaluator:
  """Everything that stays fixed across checkpoints: the pipeline and the suite (metrics, reference data).

  With `metric_names`, one evaluator per metric from the arguments; without, the workdir config's `config.evals`,
  the arguments that are given overriding each evaluator's values.
  """

  def __init__(self, workdir: str, metric_names: Sequence[str] | None, num_samples: int | None = None, **spec_kwargs):
    from diffusion.evaluation import EvalSuite, parse_evals
    from diffusion.pipeline import load_pipeline

    self.workdir = workdir
    self.pipeline = load_pipeline(workdir)
    self.config = config = self.pipeline.config
    if metric_names:
      evals = evals_spec(metric_names, 1000 if num_samples is None else num_samples, **spec_kwargs)
    else:
      if not config.get('evals'):
        raise UserError(f'{workdir!r} has no evaluators in its config (config.evals): pass --metrics')
      given = _entry(num_samples, **spec_kwargs)
      evals = ml_collections.ConfigDict({name: {**entry.to_dict(), **given} for name, entry in config.evals.items()})
    with config.unlocked():
      config.evals = evals
    self.suite = EvalSuite(parse_evals(config), config, workdir, self.pipeline)
    self.info = {
      'evaluators': self.suite.describe(),
      'metrics_info': {e.spec.name: e.metric.describe() for e in self.suite.evaluators},
    }

  def evaluate(self, step: int) -> dict:
    """Samples every evaluator's images with the EMA params of `step`; returns the record for eval/<step>.json."""
    from diffusion import checkpoint

    start = time.time()
    results = self.suite.evaluate(self.pipeline.params_at(step), step)
    return {
      'step': int(step),
      'metrics': results,
      **self.info,
      'seconds': round(time.time() - start, 2),
      **checkpoint.run_metadata(),
    }


def _write_json(path: str, record: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, path)  # Atomic: a killed job never leaves a half-written result that would be skipped.


def _init_wandb(workdir: str, config, mode: str | None):
  mode = mode or config.wandb.mode
  if mode == 'disabled':
    return None
  try:
    import wandb

    os.environ.setdefault('WANDB_SILENT', 'true')
    directory = os.path.join(workdir, 'eval')
    id_file = os.path.join(directory, 'wandb_run_id')
    run_id = open(id_file).read().strip() if os.path.exists(id_file) else secrets.token_hex(4)
    os.makedirs(directory, exist_ok=True)
    with open(id_file, 'w') as f:
      f.write(run_id)
    run = wandb.init(
      project=config.wandb.project,
      entity=config.wandb.entity or None,
      dir=directory,
      mode=mode,
      name=(config.wandb.name or os.path.basename(os.path.abspath(workdir))) + '-eval',
      group=config.wandb.group or None,
      job_type='eval',
      id=run_id,
      resume='allow',
    )
    run.define_metric('train_step')
    run.define_metric('eval/*', step_metric='train_step')
    return run
  except Exception as e:  # pylint: disable=broad-except  # W&B must never stop an evaluation.
    print(f'warning: W&B could not start ({e}); continuing without it', file=sys.stderr)
    return None


def _summary(record: dict) -> str:
  parts = [f'{k}={v:.4f}' for k, v in record['metrics'].items()]
  if 'fid_random_inception' in record['metrics']:
    parts.append('(FID from RANDOM Inception weights: compare only within this job)')
  return f'step {record["step"]}: ' + ' '.join(parts)


def _lead_decides(flag: bool) -> bool:
  """Process 0's `flag`, on every process (a collective), so all take the same branch around the evaluation."""
  from diffusion.evaluation import base

  return bool(base.sum_across_processes(float(flag) if base.is_lead() else 0.0) > 0)


def run(
  workdir: str,
  metric_names: Sequence[str] | None,
  num_samples: int | None,
  *,
  step: int | None = None,
  watch: bool = False,
  poll_seconds: float = 60.0,
  idle_timeout: float = 3600.0,
  wandb_mode: str | None = None,
  **evaluator_kwargs,
) -> list[dict]:
  """Evaluates every checkpoint (or `step`) without an eval/<step>.json; with `watch`, keeps polling.

  On several processes every process takes part (each generates its share of the samples); process 0 writes.
  """
  from diffusion.evaluation import base

  evaluator, wb, records = None, None, []
  last_new = time.time()
  seen: set[int] = set()
  try:
    while True:
      steps = checkpoint_steps(workdir)
      if step is not None and step not in steps:
        raise UserError(f'no checkpoint at step {step} in {workdir!r} (steps: {steps})')
      if set(steps) - seen:
        seen |= set(steps)
        last_new = time.time()
      for s in [step] if step is not None else steps:
        if _lead_decides(os.path.exists(eval_path(workdir, s))):
          print(f'step {s}: already evaluated ({eval_path(workdir, s)})', flush=True)
          continue
        if evaluator is None:
          evaluator = Evaluator(workdir, metric_names, num_samples, **evaluator_kwargs)
          wb = _init_wandb(workdir, evaluator.config, wandb_mode) if base.is_lead() else None
        record = evaluator.evaluate(s)
        records.append(record)
        if not base.is_lead():
          continue
        _write_json(eval_path(workdir, s), record)
        print(_summary(record), flush=True)
        if wb is not None:
          wb.log({'train_step': s, **{f'eval/{k}': v for k, v in record['metrics'].items()}})
      if not watch or step is not None:
        return records
      final = int(evaluator.config.train.num_steps if evaluator else _final_step(workdir))
      if _lead_decides(final in steps and os.path.exists(eval_path(workdir, final))):
        return records
      if _lead_decides(time.time() - last_new > idle_timeout):
        print(f'no new checkpoint for {idle_timeout:.0f}s; stopping', flush=True)
        return records
      time.sleep(poll_seconds)
  finally:
    if wb is not None:
      wb.finish()


def _final_step(workdir: str) -> int:
  from diffusion.workdir import load_workdir_config

  return int(load_workdir_config(workdir).train.num_steps)


def _define_flags() -> dict:
  """The command-line flags (defined only when run as a program, so importing this module defines none)."""
  f = flags
  defined = dict(
    workdir=f.DEFINE_string('workdir', None, 'A training workdir: stage 2 (ldm), or a VAE (psnr, ssim, lpips, rfid).'),
    metrics=f.DEFINE_list(
      'metrics',
      None,
      'Comma-separated metrics: fid, oracle, clip; psnr, ssim, lpips, rfid (reconstructions) (default: the '
      "workdir config's evaluators, config.evals, else fid,oracle; psnr,ssim,rfid for a VAE workdir).",
    ),
    num_samples=f.DEFINE_integer('num_samples', None, 'Images generated per checkpoint (default 1000).'),
    step=f.DEFINE_integer('step', None, 'Evaluate only this checkpoint step.'),
    watch=f.DEFINE_bool('watch', False, 'Follow a training run: evaluate each new checkpoint once.'),
    poll_seconds=f.DEFINE_float('poll_seconds', 60.0, 'With --watch: how often to look for new checkpoints.'),
    idle_timeout=f.DEFINE_float('idle_timeout', 3600.0, 'With --watch: stop after this long without a new checkpoint.'),
    prompts_file=f.DEFINE_string(
      'prompts_file',
      None,
      "One prompt per line, optionally prompt<TAB>seed as in sample.py (default: the split's captions).",
    ),
    split=f.DEFINE_string(
      'split', None, 'Reference split of FID and prompts (default data.train_split; reconstructions: data.eval_split).'
    ),
    num_reference=f.DEFINE_integer(
      'num_reference', None, 'Reference images for FID (at most the split; default 10000).'
    ),
    seed=f.DEFINE_integer('seed', None, 'Seed of the sampling noise (default: config.seed).'),
    guidance_scale=f.DEFINE_float('guidance_scale', None, "Guidance scale, one value (default: the config's)."),
    num_steps=f.DEFINE_integer('num_steps', None, 'Sampling steps (default: config.sample.num_steps).'),
    sampler=f.DEFINE_string('sampler', None, 'Sampler (default: config.sample.sampler).'),
    batch_size=f.DEFINE_integer(
      'batch_size', None, 'Images per sampling / Inception batch over all processes (global; default 50).'
    ),
    inception_weights=f.DEFINE_string(
      'inception_weights',
      None,
      'pytorch-fid weight file (default: random Inception weights, FID reported as fid_random_inception).',
    ),
    wandb_mode=f.DEFINE_enum('wandb_mode', None, ['online', 'offline', 'disabled'], 'Default: config.wandb.mode.'),
    clip_model=f.DEFINE_string(
      'clip_model', None, 'For --metrics clip: a transformers CLIPModel directory (config, weights, tokenizer).'
    ),
    resize_backend=f.DEFINE_string('resize_backend', None, 'For --metrics clip: the image resize backend.'),
    vgg_weights=f.DEFINE_string(
      'vgg_weights', None, "For --metrics lpips: torchvision backbone .pth or 'random' (default: config.loss's)."
    ),
    lpips_weights=f.DEFINE_string(
      'lpips_weights', None, "For --metrics lpips: the lpips package's head .pth or 'random' (default: config.loss's)."
    ),
    lpips_net=f.DEFINE_enum('lpips_net', None, ['vgg', 'alex'], "For --metrics lpips (default: config.loss's)."),
  )
  cli.alias('weights', 'inception_weights')
  cli.alias('model', 'clip_model')
  return defined


@user_errors_exit
def main(argv: list[str]) -> None:
  defined = _define_flags()
  cli.parse_flags(argv, config_flag=None, required=('workdir',))
  v = {name: flag.value for name, flag in defined.items()}
  cli.require(os.path.isdir(v['workdir']), f'workdir {v["workdir"]!r} does not exist')
  cli.require(v['num_samples'] is None or v['num_samples'] >= 2, f'--num_samples must be >= 2, got {v["num_samples"]}')
  cli.require(v['batch_size'] is None or v['batch_size'] >= 1, f'--batch_size must be >= 1, got {v["batch_size"]}')
  cli.require(v['metrics'] is None or bool(v['metrics']), '--metrics is empty')
  from diffusion import parallel
  from diffusion.evaluation import METRICS
  from diffusion.workdir import load_workdir_config

  metrics = v['metrics']
  config = load_workdir_config(v['workdir'])
  if metrics is None and not config.get('evals'):
    metrics = ['psnr', 'ssim', 'rfid'] if config.get('model_type') == 'vae' else ['fid', 'oracle']
  unknown = [m for m in metrics or () if m not in METRICS]
  cli.require(not unknown, f'unknown metric(s) {", ".join(unknown)}; known: {", ".join(METRICS.names())}')
  sampling = {'sampler': v['sampler'], 'num_steps': v['num_steps'], 'guidance_scale': v['guidance_scale']}
  options = {k: v[k] for k in ('clip_model', 'resize_backend', 'vgg_weights', 'lpips_weights', 'lpips_net') if v[k]}
  parallel.initialize_distributed()  # Multi-host launches (from the environment); else a no-op.
  records = run(
    v['workdir'],
    metrics,
    v['num_samples'],
    step=v['step'],
    watch=v['watch'],
    poll_seconds=v['poll_seconds'],
    idle_timeout=v['idle_timeout'],
    wandb_mode=v['wandb_mode'],
    prompts_file=v['prompts_file'],
    split=v['split'],
    num_reference=v['num_reference'],
    seed=v['seed'],
    sampling=sampling,
    batch_size=v['batch_size'],
    inception_weights=v['inception_weights'],
    metric_options=options or None,
  )
  print(f'evaluated {len(records)} checkpoint(s); results in {os.path.join(v["workdir"], "eval")}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
