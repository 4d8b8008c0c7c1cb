r"""The evaluation job: samples each checkpoint of a stage-2 workdir and scores the samples.

  python eval/run.py --workdir W --metrics fid,oracle --num_samples 1000 [--step S] [--watch]
  python -m eval.run --workdir W --metrics fid --inception_weights pt_inception-2015-12-05-6726825d.pth
  python eval/run.py --workdir W --metrics fid,clip --clip_model CLIP_DIR   # CLIP score (eval/clip_score.py)

For each checkpoint (EMA params), generates N images from fixed seeds (image i starts from fold_in(seed, i)) with
prompts from --prompts_file or the captions of the reference split, computes the metrics (see eval/metrics.py),
writes `<workdir>/eval/<step>.json` and logs to W&B (offline by default, under `<workdir>/eval/wandb`; its own run,
so it never collides with the training run). Steps that already have a JSON file are skipped, so a killed job
restarts where it stopped; --watch keeps following a training run, evaluating each new checkpoint once, until the
final step is done or no checkpoint has appeared for --idle_timeout seconds. Without --inception_weights, FID uses a
random Inception network and is reported as `fid_random_inception`.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from typing import Iterator, Sequence

if __name__ == '__main__' and not __package__:  # `python eval/run.py`: import the repository's packages.
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import flags  # noqa: E402

from diffusion import cli  # noqa: E402
from diffusion.errors import UserError, user_errors_exit  # noqa: E402

def eval_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, 'eval', f'{step}.json')


def checkpoint_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps, read fresh from disk (a running training job adds more)."""
  from diffusion import checkpoint

  return sorted(checkpoint.Checkpointer(workdir, read_only=True).all_steps())


def _reference_source(config, split: str, limit: int):
  """(batches(batch_size) -> iterator of uint8 images, captions, name) of a split, preprocessed as in training."""
  from diffusion.data import pipeline as data_pipeline

  try:
    source = data_pipeline.create_data_source(config.data, split)
  except (ValueError, FileNotFoundError) as e:
    raise UserError(f'cannot read the reference split {split!r}: {e}') from None
  n = min(limit, len(source))
  decode = data_pipeline.DecodeRecord(config.data.image_key, config.data.caption_key)
  resize = data_pipeline.Augment(config.data.image_size, random_crop=False, random_flip=False)
  captions = [data_pipeline.record_caption(source[i], config.data) for i in range(n)]

  def batches(batch_size: int) -> Iterator:
    import numpy as np

    rng = np.random.default_rng(0)
    batch = []
    for i in range(n):
      element = decode.map(source[i])
      if element['image'] is None:
        continue
      batch.append(resize.random_map(element, rng)['image'])
      if len(batch) == batch_size:
        yield np.stack(batch)
        batch = []
    if batch:
      yield np.stack(batch)

  return batches, captions, f'{config.data.name}-{split}-{n}'


def _prompts(captions: Sequence[str], prompts_file: str | None, num_samples: int) -> list[str]:
  if prompts_file:
    try:
      with open(prompts_file) as f:
        captions = [line.strip() for line in f if line.strip()]
    except OSError as e:
      raise UserError(f'cannot read --prompts_file: {e}') from None
  if not captions:
    raise UserError('no prompts: the prompts file or the split has no captions')
  return [captions[i % len(captions)] for i in range(num_samples)]


class Evaluator:
  """Everything that stays fixed across checkpoints: pipeline, prompts, metrics (with their reference data)."""

  def __init__(self, workdir: str, metric_names: Sequence[str], num_samples: int, *, prompts_file: str | None = None,
               split: str | None = None, num_reference: int = 10000, seed: int | None = None,
               sampling: dict | None = None, batch_size: int = 50, inception_weights: str | None = None,
               metric_options: dict | None = None):
    from diffusion.pipeline import LatentDiffusionPipeline
    from diffusion.workdir import load_workdir_config
    from eval import metrics as metrics_lib

    self.workdir, self.num_samples, self.batch_size = workdir, num_samples, batch_size
    self.config = config = load_workdir_config(workdir, expect='ldm')
    self.seed = config.seed if seed is None else seed
    split = split or config.data.train_split
    batches, captions, name = _reference_source(config, split, num_reference)
    self.prompts = _prompts(captions, prompts_file, num_samples)
    s = config.sample
    self.sampling = {'sampler': s.sampler, 'num_steps': int(s.num_steps), 'guidance_scale': float(s.guidance_scale),
                     'negative_prompt': s.get('negative_prompt', ''),
                     **{k: v for k, v in (sampling or {}).items() if v is not None}}
    context = metrics_lib.EvalContext(workdir, config, batches, name, batch_size, inception_weights, self.seed,
                                      options=dict(metric_options or {}))
    self.metrics = [metrics_lib.create_metric(m, context) for m in metric_names]
    self.pipeline = LatentDiffusionPipeline.from_workdir(workdir)
    self.info = {'num_samples': num_samples, 'seed': self.seed, **self.sampling, 'use_ema': True,
                 'prompts': prompts_file or f'captions of {name}', 'reference': name,
                 'metrics_info': {m.name: m.describe() for m in self.metrics}}

  def evaluate(self, step: int) -> dict:
    """Samples `num_samples` images with the EMA params of `step` and returns the record for eval/<step>.json."""
    import numpy as np

    from diffusion import checkpoint

    start = time.time()
    trained = checkpoint.Checkpointer(self.workdir, read_only=True).restore_params(step, 'ema_params')
    params = {**self.pipeline.params, 'unet': trained['unet'], 'text': trained['text']}
    for metric in self.metrics:
      metric.reset()
    for lo in range(0, self.num_samples, self.batch_size):
      prompts = self.prompts[lo:lo + self.batch_size]
      n = len(prompts)
      padded = prompts + [prompts[-1]] * (self.batch_size - n)  # One batch shape: sampling compiles once.
      images = self.pipeline.generate(padded, seed=self.seed, indices=np.arange(lo, lo + len(padded)),
                                      batch_size=self.batch_size, params=params, **self.sampling)[:n]
      for metric in self.metrics:
        metric.update(images, prompts)
    results = {}
    for metric in self.metrics:
      results.update(metric.result())
    return {'step': int(step), 'metrics': results, **self.info, 'seconds': round(time.time() - start, 2),
            **checkpoint.run_metadata()}


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
    run = wandb.init(project=config.wandb.project, entity=config.wandb.entity or None, dir=directory, mode=mode,
                     name=(config.wandb.name or os.path.basename(os.path.abspath(workdir))) + '-eval',
                     group=config.wandb.group or None, job_type='eval', id=run_id, resume='allow')
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


def run(workdir: str, metric_names: Sequence[str], num_samples: int, *, step: int | None = None,
        watch: bool = False, poll_seconds: float = 60.0, idle_timeout: float = 3600.0, wandb_mode: str | None = None,
        **evaluator_kwargs) -> list[dict]:
  """Evaluates every checkpoint (or `step`) without an eval/<step>.json; with `watch`, keeps polling."""
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
      for s in ([step] if step is not None else steps):
        if os.path.exists(eval_path(workdir, s)):
          print(f'step {s}: already evaluated ({eval_path(workdir, s)})', flush=True)
          continue
        if evaluator is None:
          evaluator = Evaluator(workdir, metric_names, num_samples, **evaluator_kwargs)
          wb = _init_wandb(workdir, evaluator.config, wandb_mode) if _is_lead() else None
        record = evaluator.evaluate(s)
        records.append(record)
        if not _is_lead():
          continue
        _write_json(eval_path(workdir, s), record)
        print(_summary(record), flush=True)
        if wb is not None:
          wb.log({'train_step': s, **{f'eval/{k}': v for k, v in record['metrics'].items()}})
      if not watch or step is not None:
        return records
      final = int(evaluator.config.train.num_steps if evaluator else _final_step(workdir))
      if final in steps and os.path.exists(eval_path(workdir, final)):
        return records
      if time.time() - last_new > idle_timeout:
        print(f'no new checkpoint for {idle_timeout:.0f}s; stopping', flush=True)
        return records
      time.sleep(poll_seconds)
  finally:
    if wb is not None:
      wb.finish()


def _is_lead() -> bool:
  import jax

  return jax.process_index() == 0


def _final_step(workdir: str) -> int:
  from diffusion.workdir import load_workdir_config

  return int(load_workdir_config(workdir).train.num_steps)


def _define_flags() -> dict:
  """The command-line flags (defined only when run as a program, so importing this module defines none)."""
  f = flags
  return dict(
      workdir=f.DEFINE_string('workdir', None, 'A stage-2 (ldm) training workdir.'),
      metrics=f.DEFINE_list('metrics', ['fid', 'oracle'], 'Comma-separated metrics: fid, oracle, clip.'),
      num_samples=f.DEFINE_integer('num_samples', 1000, 'Images generated per checkpoint.'),
      step=f.DEFINE_integer('step', None, 'Evaluate only this checkpoint step.'),
      watch=f.DEFINE_bool('watch', False, 'Follow a training run: evaluate each new checkpoint once.'),
      poll_seconds=f.DEFINE_float('poll_seconds', 60.0, 'With --watch: how often to look for new checkpoints.'),
      idle_timeout=f.DEFINE_float('idle_timeout', 3600.0, 'With --watch: stop after this long without a new '
                                  'checkpoint.'),
      prompts_file=f.DEFINE_string('prompts_file', None, "One prompt per line (default: the split's captions)."),
      split=f.DEFINE_string('split', None, 'Reference split for FID and prompts (default: data.train_split).'),
      num_reference=f.DEFINE_integer('num_reference', 10000, 'Reference images for FID (at most the split).'),
      seed=f.DEFINE_integer('seed', None, 'Seed of the sampling noise (default: config.seed).'),
      guidance_scale=f.DEFINE_float('guidance_scale', None, 'Guidance scale (default: the config\'s).'),
      num_steps=f.DEFINE_integer('num_steps', None, 'Sampling steps (default: config.sample.num_steps).'),
      sampler=f.DEFINE_string('sampler', None, 'Sampler (default: config.sample.sampler).'),
      batch_size=f.DEFINE_integer('batch_size', 50, 'Images per sampling / Inception batch.'),
      inception_weights=f.DEFINE_string('inception_weights', None, 'pytorch-fid weight file (default: random '
                                        'Inception weights, FID reported as fid_random_inception).'),
      wandb_mode=f.DEFINE_enum('wandb_mode', None, ['online', 'offline', 'disabled'], 'Default: config.wandb.mode.'),
      clip_model=f.DEFINE_string('clip_model', None, 'For --metrics clip: a transformers CLIPModel directory '
                                 '(config, weights, tokenizer; see eval/clip_score.py).'),
  )


@user_errors_exit
def main(argv: list[str]) -> None:
  defined = _define_flags()
  cli.parse_flags(argv, config_flag=None)
  v = {name: flag.value for name, flag in defined.items()}
  cli.require(bool(v['workdir']), '--workdir is required')
  cli.require(os.path.isdir(v['workdir']), f'workdir {v["workdir"]!r} does not exist')
  cli.require(v['num_samples'] >= 2, f'--num_samples must be >= 2, got {v["num_samples"]}')
  cli.require(v['batch_size'] >= 1, f'--batch_size must be >= 1, got {v["batch_size"]}')
  cli.require(bool(v['metrics']), '--metrics is empty')
  from eval import metrics as metrics_lib

  known = metrics_lib.available_metrics()
  unknown = [m for m in v['metrics'] if m not in known]
  cli.require(not unknown, f'unknown metric(s) {", ".join(unknown)}; known: {", ".join(known)}')
  from diffusion import samplers

  names = samplers.available_samplers()
  cli.require(v['sampler'] is None or v['sampler'] in names, f'unknown sampler {v["sampler"]!r}; known: '
              f'{", ".join(names)}')
  sampling = {'sampler': v['sampler'], 'num_steps': v['num_steps'], 'guidance_scale': v['guidance_scale']}
  from diffusion import parallel

  parallel.initialize_distributed()  # Multi-host launches (from the environment); else a no-op.
  records = run(v['workdir'], v['metrics'], v['num_samples'], step=v['step'], watch=v['watch'],
                poll_seconds=v['poll_seconds'], idle_timeout=v['idle_timeout'], wandb_mode=v['wandb_mode'],
                prompts_file=v['prompts_file'], split=v['split'], num_reference=v['num_reference'], seed=v['seed'],
                sampling=sampling, batch_size=v['batch_size'], inception_weights=v['inception_weights'],
                metric_options={'clip_model': v['clip_model']} if v['clip_model'] else None)
  print(f'evaluated {len(records)} checkpoint(s); results in {os.path.join(v["workdir"], "eval")}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
