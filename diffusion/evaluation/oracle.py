"""The 'oracle' metric: caption accuracy of generated shapes scenes, read by the dataset's oracle.

An image counts as right when `diffusion.data.oracle` finds its prompt's content (colours, shapes, relation) in it.
The control scores every image against another prompt of the evaluation (a fixed, seeded permutation of its distinct
prompts), which is near chance for any model. Both are counts of this process's samples, summed over processes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from diffusion.errors import UserError
from diffusion.evaluation import base


class OracleMetric:
  """Fraction of images whose content the shapes oracle finds to match their prompt (and a shuffled control)."""

  name = 'oracle'

  def __init__(self, context: base.EvalContext):
    if context.config is not None and context.config.data.name != 'shapes':
      raise UserError(
        f'metric oracle: {context.workdir!r} was not trained on the shapes dataset; the oracle only reads shapes scenes'
      )
    vocabulary = sorted(set(context.prompts))
    permuted = np.random.default_rng(context.seed).permutation(len(vocabulary))
    self.control_prompt = {p: vocabulary[j] for p, j in zip(vocabulary, permuted)}
    self.reset()

  def reset(self) -> None:
    self.counts = np.zeros(3)  # Images, matches, control matches.

  def update(self, images: np.ndarray, prompts: Sequence[str]) -> None:
    from diffusion.data import oracle

    try:
      for image, prompt in zip(images, prompts):
        control = self.control_prompt.get(prompt, prompt)
        self.counts += (1.0, oracle.caption_matches(image, prompt), oracle.caption_matches(image, control))
    except ValueError as e:  # A prompt outside the shapes grammar.
      raise UserError(f'metric oracle: {e}') from None

  def result(self) -> dict[str, float]:
    images, matches, control = base.sum_across_processes(self.counts)
    if not images:
      raise UserError('metric oracle: no images were scored')
    return {'oracle_caption_accuracy': float(matches / images), 'oracle_shuffled_prompts': float(control / images)}

  def describe(self) -> dict[str, Any]:
    return {
      'metric': 'oracle_caption_accuracy',
      'control': 'oracle_shuffled_prompts (each image against another prompt of the evaluation: chance level)',
    }


base.METRICS.add('oracle', OracleMetric)
