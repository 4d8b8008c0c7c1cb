"""LoRA training: a stage-2 run (`config.lora.rank > 0`) that trains low-rank updates of the frozen `base_workdir`.

The base (a trained LDM workdir or a scripts/convert.py import) is read at every start and never written: its EMA
U-Net and text params are the task's frozen part `frozen['base']` (with its VAE as `frozen['vae']`), so they get no
gradient, no optimizer state and no EMA, and checkpoints hold only the LoRA factors {'a', 'b'} per adapted module
(`diffusion.lora`; alpha stays out of the trained tree: the loss scales every update by lora.alpha / lora.rank). The
loss, the validation loss and the sample grids are the LDM task's on the effective params `lora.apply(base, lora)`;
with `lora.dropout > 0` the training loss runs the LoRA unmerged instead (`lora.unmerged`: each adapted module's
LoRA input dropped out, example i's masks drawn from its own key).
The model, tokenizer and diffusion process come from the base workdir (the run's config cannot change them); the run
keeps its data, optimizer, loss weighting and caption dropout. `loop.py` records the base's params hash
(`workdir.record_built_on`) and refuses a changed base at resume.

`stage2_task` is the 'ldm' entry of `TASKS`: the plain LDM task, or this one when `config.lora.rank > 0`.
"""

from typing import Any

import jax
import ml_collections

from diffusion import lora as lora_lib
from diffusion import workdir as workdir_lib
from diffusion.errors import ConfigError
from diffusion.training import dreambooth
from diffusion.training.ldm_task import LDMTask, cast_tree, frozen_dtype
from diffusion.training.task import TASKS, Task, load_base_params, resolved_copy

# Diffusion keys a LoRA run may choose for itself (training-time choices); the rest is the base's process.
RUN_DIFFUSION_KEYS = ('loss_weighting', 'caption_dropout', 'offset_noise', 'min_snr_gamma')


def multiplier(config: ml_collections.ConfigDict) -> float:
  """The factor alpha / rank of every trained LoRA update."""
  return float(config.lora.alpha) / int(config.lora.rank)


def _base_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run's config with the model, tokenizer length and diffusion process of its base workdir."""
  base = workdir_lib.load_workdir_config(config.base_workdir, expect='ldm', key='base_workdir')
  if lora_lib.trains_lora(base):
    raise ConfigError('base_workdir', f'{config.base_workdir!r} is itself a LoRA run: give the base it was trained on')
  config.model = ml_collections.ConfigDict(base.model.to_dict())
  diffusion = ml_collections.ConfigDict(base.diffusion.to_dict())
  for key in RUN_DIFFUSION_KEYS:
    if key in config.diffusion:
      diffusion[key] = config.diffusion[key]
  config.diffusion = diffusion
  config.data.image_size = base.data.image_size
  config.data.max_text_length = base.data.max_text_length
  return config


class LoRATask(LDMTask):
  """The task protocol for LoRA training on a frozen stage-2 base (see the module docstring)."""

  name = 'lora'

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    config = _base_sections(resolved_copy(config))
    base_dir = config.base_workdir
    vae = workdir_lib.load_frozen(base_dir, 'vae', key='base_workdir')
    self._vae_source = vae
    self.base = load_base_params(config)
    tokenizer = workdir_lib.load_tokenizer(base_dir, key='base_workdir')
    if dreambooth.enabled(config):  # New words, the prior's images drawn by the base, the combined data.
      tokenizer = dreambooth.prepare(config, workdir, tokenizer)
    self._build(config, vae, tokenizer, workdir)
    self.frozen['base'] = cast_tree(self.base, frozen_dtype(config)) if self._bf16_frozen else self.base
    self.multiplier = multiplier(config)
    self.dropout = float(config.lora.dropout)

  def _trains_text(self, config: ml_collections.ConfigDict) -> bool:
    return bool(config.lora.text_encoder)  # The base's text encoder gets gradients only through its LoRA.

  def _frozen_text_params(self, workdir: str) -> Any:
    del workdir  # The text encoder is the base's.
    return cast_tree(self.base['text'], frozen_dtype(self.config))

  @property
  def frozen_param_groups(self) -> tuple[str, ...]:
    return ()  # Every LoRA factor trains; the base is not part of the params.

  def built_on(self) -> dict[str, Any]:
    return {}  # The loop records config.base_workdir (the base's EMA params).

  def init_params(self, rng: jax.Array) -> Any:
    """Fresh LoRA factors (B zero: the adapted model starts as the base), without alpha."""
    c = self.config.lora
    return lora_lib.factors(lora_lib.init(rng, self.base, c.rank, c.alpha, lora_lib.config_targets(c)))

  def effective(self, params: Any, frozen: Any) -> Any:
    """The base's params with the LoRA updates (jittable; on host arrays it merges on the host)."""
    return lora_lib.apply(frozen['base'], params, 1.0, multiplier=self.multiplier)

  def loss_fn(self, params: Any, frozen: Any, batch: dict, keys: jax.Array, step: jax.Array):
    if self.dropout > 0:  # The LoRA unmerged, its inputs dropped out per example (each mask from the example's key).
      networks = {'unet': self.unet, 'text': self.text_encoder}
      with lora_lib.unmerged(params, multiplier=self.multiplier, rate=self.dropout, keys=keys, parts=networks):
        return super().loss_fn(frozen['base'], frozen, batch, keys, step)
    return super().loss_fn(self.effective(params, frozen), frozen, batch, keys, step)

  def eval_step(self, params: Any, frozen: Any, batch: dict, keys: jax.Array) -> dict:
    return super().eval_step(self.effective(params, frozen), frozen, batch, keys)

  def sampling_params(self, params: Any, frozen: Any) -> dict:
    """The base with the LoRA merged in (host arrays: merged on the host) and the frozen VAE: what evaluators sample."""
    return {**self.effective(params, frozen), 'vae': frozen['vae']}

  def sample_grid(self, params: Any, frozen: Any):
    return super().sample_grid(self.effective(params, frozen), frozen)

  def meta(self) -> dict:
    return {**super().meta(), 'lora_rank': int(self.config.lora.rank)}


def stage2_task(config: ml_collections.ConfigDict, workdir: str) -> Task:
  """The 'ldm' task: LoRA training on `base_workdir` when `config.lora.rank > 0`, else the plain LDM task."""
  return LoRATask(config, workdir) if lora_lib.trains_lora(config) else LDMTask(config, workdir)


TASKS.add('ldm', stage2_task)
