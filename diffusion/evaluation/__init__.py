"""Evaluators: metrics of generated images (FID, CLIP score, the shapes oracle) and of reconstructions (PSNR, SSIM,
LPIPS, rFID) behind one registry, and the suite that runs the evaluators of `config.evals` (training) or of a tool's
flags (eval/run.py, eval/caption_accuracy.py).

  suite = build_suite(config, workdir, pipeline)  # None when config.evals is empty
"""

from __future__ import annotations

from typing import Any

import ml_collections

from diffusion.evaluation import clip_score, fid, oracle, reconstruction  # noqa: F401  # Register the metrics.
from diffusion.evaluation.base import METRICS, EvalContext, Metric, sum_across_processes
from diffusion.evaluation.spec import EvaluatorSpec, parse_evals, parse_evaluator, validate_evals
from diffusion.evaluation.suite import EvalSuite


def build_suite(config: ml_collections.ConfigDict, workdir: str, pipeline: Any) -> EvalSuite | None:
  """The suite of `config.evals` for a job on `workdir` with `pipeline` (None when the section is empty)."""
  specs = parse_evals(config)
  return EvalSuite(specs, config, workdir, pipeline) if specs else None


__all__ = [
  'METRICS',
  'EvalContext',
  'EvalSuite',
  'EvaluatorSpec',
  'Metric',
  'build_suite',
  'parse_evals',
  'parse_evaluator',
  'sum_across_processes',
  'validate_evals',
]
