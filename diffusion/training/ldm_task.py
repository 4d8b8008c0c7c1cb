"""Stage 2: text-conditioned latent diffusion on a frozen VAE (eps/x0/v/flow prediction, caption dropout for CFG).

The objective comes from `config.diffusion` alone: the schedule (and so the training-time distribution: uniform
integer t, EDM's log-normal sigma, or flow matching's uniform / logit-normal t), the prediction type, the loss
weighting and offset noise; see `losses.noised_example` and `losses.get_diffusion_loss_fn`.

At the start of a fresh run the task copies the VAE's EMA params into `<workdir>/frozen/vae`, builds (or loads) the
tokenizer into `<workdir>/tokenizer`, and (`calibrate`) computes the latent scale factor from data (1 / std of posterior
samples, as LDM does); the factor, the VAE config and the vocabulary size are then part of the saved `config.json`, so
the workdir is self-contained. On resume everything is read back from the workdir. The task never changes the config it
is given: `task.config` is its resolved copy.

A frozen text encoder (`model.text.trainable=False`) with a latent cache holding its embeddings (scripts/
precompute_latents.py --text_embeddings) never runs in the train step: the batches carry each example's caption
embedding and caption dropout swaps in the cache's empty-prompt embedding, so the loss equals encoding on the fly. Its
params stay in the train state (sampling and checkpoints use them); the cache is refused unless it was computed with
exactly these params (`latent_cache.check_training_cache`), and refused for a trained text encoder.

`train.frozen_param_dtype='bfloat16'` keeps the frozen VAE and a frozen text encoder in bfloat16 on the devices (half
their memory); the networks still compute in their compute dtype (float32 by default) from the bf16-rounded weights.
The VAE workdir's float32 params are what `built_on` records and what the cache check hashes.
"""

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import checkpoint, losses, models, process
from diffusion import workdir as workdir_lib
from diffusion.data import latent_cache
from diffusion.data import shapes as shapes_lib
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.errors import ConfigError
from diffusion.images import make_grid
from diffusion.pipeline import LatentDiffusionPipeline
from diffusion.training import dreambooth
from diffusion.training.state import with_compute_dtype
from diffusion.training.task import Batches, resolved_copy


def _frozen_vae(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """The frozen VAE params: the workdir's own copy on resume, else the VAE workdir's EMA params (copied over, and
  its model config into `config.model.vae`)."""
  if workdir_lib.has_frozen(workdir, 'vae'):
    return workdir_lib.load_frozen(workdir, 'vae')
  if not config.vae_workdir and config.get('init_from') and workdir_lib.has_frozen(config.init_from, 'vae'):
    # Fine-tuning a stage-2 workdir: its VAE (and the VAE section it was trained with).
    previous = workdir_lib.load_workdir_config(config.init_from, expect='ldm', key='init_from')
    config.model.vae = _vae_section(previous.model.vae, config.model.vae)
    params = workdir_lib.load_frozen(config.init_from, 'vae', key='init_from')
    workdir_lib.save_frozen(workdir, 'vae', params)
    return params
  if not config.vae_workdir:
    raise ConfigError('vae_workdir', 'is empty: stage 2 needs a trained VAE (train configs/vae_base.py first)')
  vae_config = workdir_lib.load_workdir_config(config.vae_workdir, expect='vae', key='vae_workdir')
  config.model.vae = _vae_section(vae_config.model.vae, config.model.vae)
  params, _ = workdir_lib.load_trained_params(config.vae_workdir, item='ema_params', key='vae_workdir')
  workdir_lib.save_frozen(workdir, 'vae', params)  # Every process takes part in the (collective) save.
  return params


def _vae_section(architecture: ml_collections.ConfigDict, run: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The VAE section a stage-2 run uses: the architecture of the VAE it was built on, with this run's choice of
  attention kernel (an implementation detail of the device, not of the weights)."""
  section = ml_collections.ConfigDict(architecture.to_dict())
  section.attention = run.get('attention', 'auto')
  return section


def _vocabulary(data_config: ml_collections.ConfigDict) -> list[str]:
  if data_config.name == 'shapes':
    return list(shapes_lib.vocabulary())
  if data_config.get('latent_cache'):  # The cache holds the captions: the image dataset is not needed.
    return latent_cache.cached_captions(data_config.latent_cache, data_config.train_split)
  from diffusion.data import pipeline as data_pipeline

  source = data_pipeline.create_data_source(data_config, data_config.train_split)
  return [data_pipeline.record_caption(source[i], data_config) for i in range(min(len(source), 100_000))]


def _tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """The workdir's tokenizer on resume; else the `init_from` workdir's (its text encoder's ids), a path/hub id, or
  one built from the data vocabulary (saved into the workdir)."""
  if workdir_lib.has_tokenizer(workdir):
    return workdir_lib.load_tokenizer(workdir)
  if config.model.text.tokenizer:
    tokenizer = tokenizer_lib.load_tokenizer(config.model.text.tokenizer)
  elif config.get('init_from') and workdir_lib.has_tokenizer(config.init_from):
    tokenizer = workdir_lib.load_tokenizer(config.init_from, key='init_from')
  else:
    tokenizer = tokenizer_lib.build_word_tokenizer(_vocabulary(config.data), config.data.max_text_length)
  if jax.process_index() == 0:
    tokenizer_lib.save_tokenizer(tokenizer, workdir_lib.tokenizer_path(workdir))
  return tokenizer


def frozen_param_groups(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Top-level param groups the optimizer must leave alone (a pretrained, frozen text encoder)."""
  return () if config.model.text.trainable else ('text',)


def frozen_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """The dtype frozen params are kept in on the devices (`train.frozen_param_dtype`, default float32)."""
  return jnp.dtype(config.train.get('frozen_param_dtype', 'float32') or 'float32')


def cast_tree(tree: Any, dtype: jnp.dtype) -> Any:
  """Floating leaves of `tree` in `dtype` (others unchanged); the tree itself when nothing changes."""
  if all(jnp.dtype(x.dtype) == dtype or not jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(tree)):
    return tree
  return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _has_checkpoint(workdir: str) -> bool:
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return False
  return checkpoint.Checkpointer(os.path.abspath(workdir), read_only=True).latest_step() is not None


class LDMTask:
  """The task protocol (`diffusion.training.task.Task`) for stage 2: params, loss, validation loss, sample grids."""

  name = 'ldm'

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    config = resolved_copy(config)
    if workdir_lib.has_config(workdir):
      # Resume: model facts computed at the start of the run win over the command line.
      previous = workdir_lib.load_workdir_config(workdir, expect='ldm')
      config.model.vae = _vae_section(previous.model.vae, config.model.vae)
      config.model.text.vocab_size = previous.model.text.vocab_size
    vae = _frozen_vae(config, workdir)
    self._vae_source = vae  # float32, as the VAE workdir holds it: what built_on records.
    tokenizer = _tokenizer(config, workdir)
    if dreambooth.enabled(config):  # Full fine-tuning on a concept: new words, the prior's images, the combined data.
      tokenizer = dreambooth.prepare(config, workdir, tokenizer)
    self._build(config, vae, tokenizer, workdir)

  def _build(self, config: ml_collections.ConfigDict, vae: Any, tokenizer: Any, workdir: str) -> None:
    """Networks, objective, caption-dropout inputs and the latent-cache check of a resolved `config` on the frozen
    `vae` (shared by the tasks built on this one)."""
    self.tokenizer = tokenizer
    unknown = tokenizer_lib.unknown_words(tokenizer, list(config.sample.prompts))
    if unknown:  # Before compiling, not at the first sample grid.
      raise ConfigError('sample.prompts', f'word(s) {unknown} are not in the tokenizer (they would become <unk>)')
    config.model.text.vocab_size = len(self.tokenizer)
    self.config = config
    self.train_text = self._trains_text(config)  # Whether gradients reach the text encoder.
    self.vae = models.create_vae(with_compute_dtype(config.model.vae, config.train))
    self.unet = models.create_unet(with_compute_dtype(config.model.unet, config.train))
    text_config = with_compute_dtype(config.model.text, config.train)
    self.text_encoder = models.create_text_encoder(text_config)
    self.text_dtype = jnp.dtype(text_config.dtype)
    self.schedule = process.get_noise_schedule(config.diffusion)
    self.diffusion_loss = losses.get_diffusion_loss_fn(config.diffusion)
    self._pipeline = None
    self.null_ids = jnp.asarray(tokenizer_lib.tokenize(self.tokenizer, [''], config.data.max_text_length)[0])
    self.null_context = None  # The cache's empty-prompt embedding, when the batches carry text embeddings.
    cache = config.data.get('latent_cache')
    if cache:  # Refuse latents (and text embeddings) made by another VAE, text encoder, dataset or augmentation.
      text_cached = latent_cache.has_text_embeddings(cache, config.data.train_split)
      frozen_text = text_cached and not self.train_text
      text = (self._frozen_text_params(workdir), self.tokenizer) if frozen_text else None
      latent_cache.check_training_cache(config, vae, text)
      if frozen_text:
        self.null_context = jnp.asarray(latent_cache.load_null_text_embedding(cache, config.data.train_split))
    self.frozen = {'vae': cast_tree(jax.device_get(vae), frozen_dtype(config)) if self._bf16_frozen else vae}

  def _trains_text(self, config: ml_collections.ConfigDict) -> bool:
    return bool(config.model.text.trainable)

  @property
  def _bf16_frozen(self) -> bool:
    return frozen_dtype(self.config) != jnp.float32

  def _frozen_text_params(self, workdir: str) -> Any:
    """The frozen text params this run's train state will hold (in `train.frozen_param_dtype`): the workdir's latest
    checkpoint's (a resume, or a scripts/convert.py import), else the `init_from` workdir's EMA params, else the fresh
    init from the loop's init key (`split(PRNGKey(seed))[0]`)."""
    if _has_checkpoint(workdir):
      params = workdir_lib.load_trained_params(workdir, 'params')[0]['text']
    elif self.config.get('init_from'):
      params = workdir_lib.load_trained_params(self.config.init_from, 'ema_params', key='init_from')[0]['text']
    else:
      rng_init = jax.random.split(jax.random.PRNGKey(self.config.seed))[0]
      params = jax.jit(self.init_text_params)(rng_init)
    return cast_tree(params, frozen_dtype(self.config))

  @property
  def frozen_param_groups(self) -> tuple[str, ...]:
    return frozen_param_groups(self.config)

  def built_on(self) -> dict[str, Any]:
    # A run fine-tuning an LDM workdir without vae_workdir took the VAE over from init_from (recorded under that key).
    return {'vae_workdir': self._vae_source} if self.config.vae_workdir else {}

  def calibrate(self, batches: Batches, num_batches: int = 4) -> str | None:
    """Unless set, model.vae.scaling_factor = 1 / std of posterior latent samples over a few global batches."""
    if self.config.model.vae.scaling_factor > 0:
      return None
    encode = jax.jit(lambda p, b, k: sample_posterior(*self._posterior(p, b), k))
    iterator = batches()
    latents = [encode(self.frozen['vae'], next(iterator), jax.random.PRNGKey(i)) for i in range(num_batches)]
    std = float(jnp.std(jnp.concatenate(latents)))
    self.config.model.vae.scaling_factor = 1.0 / std
    return f'latent scaling factor computed from data: {self.config.model.vae.scaling_factor:.5f}'

  def init_params(self, rng: jax.Array) -> Any:
    c = self.config
    latent = c.model.unet.sample_size
    x = jnp.zeros((1, latent, latent, c.model.unet.in_channels), jnp.float32)
    context = jnp.zeros((1, c.data.max_text_length, c.model.unet.cross_attention_dim), jnp.float32)
    unet = self.unet.init(jax.random.split(rng)[0], x, jnp.zeros((1,), jnp.int32), context)['params']
    return {'unet': unet, 'text': self.init_text_params(rng)}

  def init_text_params(self, rng: jax.Array) -> Any:
    """The text encoder's part of `init_params(rng)` (a frozen one in train.frozen_param_dtype)."""
    c = self.config
    ids = jnp.zeros((1, c.data.max_text_length), jnp.int32)
    text = self.text_encoder.init(jax.random.split(rng)[1], ids)['params']
    return text if c.model.text.trainable else cast_tree(text, frozen_dtype(c))

  def _forward(self, params: Any, frozen: Any, batch: dict, keys: jax.Array, drop_captions: bool) -> tuple:
    """Noises the latents of `batch` with each example's key and returns (network output, z0, noise, t)."""
    c = self.config
    split = jax.vmap(lambda k: jax.random.split(k, 4))(keys)
    k_latent, k_t, k_noise, k_drop = (split[:, i] for i in range(4))
    z0 = jax.vmap(sample_posterior)(*self._posterior(frozen['vae'], batch), k_latent) * c.model.vae.scaling_factor
    noised = lambda kt, kn, z: losses.noised_example(kt, kn, z, self.schedule, c.diffusion.offset_noise)
    x_t, t, noise = jax.vmap(noised)(k_t, k_noise, z0)  # t per the schedule: integer, EDM log-normal or flow.
    drop = None
    if drop_captions and c.diffusion.caption_dropout > 0:
      drop = jax.vmap(lambda k: jax.random.uniform(k) < c.diffusion.caption_dropout)(k_drop)
    output = self.unet.apply({'params': params['unet']}, x_t, t, self._context(params, batch, drop))
    return output.astype(jnp.float32), z0, noise, t  # The loss in float32 whatever the compute dtype.

  def _context(self, params: Any, batch: dict, drop: jax.Array | None) -> jax.Array:
    """The text encoder's hidden states of the batch's captions (the empty prompt where `drop`): read from the latent
    cache's embeddings when the batch carries them (the encoder does not run), else encoded."""
    if 'text_embedding' in batch and self.null_context is not None:
      context = batch['text_embedding']
      if drop is not None:
        context = jnp.where(drop[:, None, None], self.null_context[None], context)
      return context.astype(self.text_dtype)
    ids = batch['input_ids']
    if drop is not None:
      ids = jnp.where(drop[:, None], self.null_ids[None], ids)
    text_params = params['text'] if self.train_text else jax.lax.stop_gradient(params['text'])
    return self.text_encoder.apply({'params': text_params}, ids)[0]

  def _posterior(self, vae_params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(mean, logvar) of q(z|x): read from a latent-cache batch, else the frozen VAE encodes the images."""
    if 'latent_mean' in batch:
      return batch['latent_mean'], batch['latent_logvar']
    return self.vae.apply({'params': vae_params}, batch['image'], method='encode')

  def loss_fn(self, params: Any, frozen: Any, batch: dict, keys: jax.Array, step: jax.Array):
    del step
    output, z0, noise, t = self._forward(params, frozen, batch, keys, drop_captions=True)
    per_example = self.diffusion_loss(output, z0, noise, t, self.schedule)
    if 'loss_weight' in batch:  # DreamBooth: 1 for instance images, prior_loss_weight for the prior's images.
      return jnp.mean(batch['loss_weight'] * per_example), {}
    return jnp.mean(per_example), {}

  def eval_step(self, params: Any, frozen: Any, batch: dict, keys: jax.Array) -> dict:
    output, z0, noise, t = self._forward(params, frozen, batch, keys, drop_captions=False)
    return {'val_loss': jnp.mean(self.diffusion_loss(output, z0, noise, t, self.schedule))}

  def prepare_sampling(self, held_out: Callable[[], dict]) -> None:
    del held_out  # Samples come from the configured prompts.
    self.sampling_pipeline()

  def sample_grid(self, params: Any, frozen: Any) -> tuple[np.ndarray, str]:
    """One row per configured prompt, `sample.num_images_per_prompt` columns, from the given (EMA) params."""
    s = self.config.sample
    prompts = [p for p in s.prompts for _ in range(s.num_images_per_prompt)]
    images = self.sampling_pipeline().generate(prompts, seed=self.config.seed, params={**params, 'vae': frozen['vae']})
    return make_grid(images, ncols=s.num_images_per_prompt), ' | '.join(s.prompts)

  def sampling_params(self, params: Any, frozen: Any) -> dict:
    return {**params, **frozen}

  def sampling_pipeline(self) -> LatentDiffusionPipeline:
    """One pipeline per task, so its jitted sampling loop compiles once; call it with `params=`."""
    if self._pipeline is None:
      self._pipeline = LatentDiffusionPipeline(self.config, {'vae': self.frozen['vae']}, self.tokenizer)
    return self._pipeline

  def aux_networks(self) -> None:
    return None  # Trains the U-Net (and text encoder) only.

  def meta(self) -> dict:
    return {'model_type': 'ldm', 'scaling_factor': float(self.config.model.vae.scaling_factor)}


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """z ~ N(mean, exp(logvar)), unscaled; the one sampling step for latents encoded on the fly or cached."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
