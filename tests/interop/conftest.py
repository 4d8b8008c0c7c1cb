"""Fixtures: tiny random-weight diffusers / transformers models saved with save_pretrained (nothing downloaded),
and a tiny Stable-Diffusion pipeline directory with a real CLIP BPE tokenizer (the vocabulary that ships in the
open_clip wheel). Helpers reach the tests through the `ref` fixture (conftest modules are not importable under
--import-mode=importlib).
"""

import gzip
import os
import types

import numpy as np
import pytest

from support import write_clip_bpe

try:  # The PyTorch reference stack (the `test` extra); fixtures that need it skip without it.
  import diffusers
  import torch
  import transformers
except ImportError:
  diffusers = torch = transformers = None

# A U-Net, VAE and CLIP text encoder small enough for CPU tests, SD-shaped (cross-attention, f4 VAE, 77 tokens).
TINY_UNET = dict(
  sample_size=8,
  in_channels=4,
  out_channels=4,
  block_out_channels=(16, 32),
  layers_per_block=1,
  down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
  attention_head_dim=2,
  cross_attention_dim=32,
  norm_num_groups=8,
)
TINY_VAE = dict(
  in_channels=3,
  out_channels=3,
  down_block_types=('DownEncoderBlock2D',) * 3,
  up_block_types=('UpDecoderBlock2D',) * 3,
  block_out_channels=(8, 16, 16),
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=4,
  sample_size=32,
  scaling_factor=0.3,
)
TINY_TEXT = dict(
  vocab_size=49408,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=2,
  max_position_embeddings=77,
  hidden_act='quick_gelu',
  eos_token_id=2,
  bos_token_id=49406,
  pad_token_id=49407,
)


def perturb(model: 'torch.nn.Module', seed: int = 0) -> 'torch.nn.Module':
  """Moves norm scales / biases off their 1 / 0 init so that a swapped or skipped tensor shows in outputs."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      if param.ndim == 1:
        param.add_(0.1 * torch.randn(param.shape, generator=gen))
  return model.eval()


def write_clip_tokenizer_files(directory: str) -> str:
  """vocab.json + merges.txt of OpenAI's CLIP BPE (49408 tokens), from open_clip's bundled merges."""
  open_clip = pytest.importorskip('open_clip')
  path = os.path.join(os.path.dirname(open_clip.__file__), 'bpe_simple_vocab_16e6.txt.gz')
  merges = gzip.open(path).read().decode('utf-8').split('\n')[1 : 49152 - 256 - 2 + 1]
  write_clip_bpe(directory, merges)
  return directory


def _require_reference() -> None:
  if torch is None:
    pytest.skip('needs the PyTorch reference stack (torch, diffusers, transformers)')


@pytest.fixture(scope='session')
def clip_tokenizer(tmp_path_factory):
  _require_reference()
  directory = write_clip_tokenizer_files(str(tmp_path_factory.mktemp('clip_bpe')))
  tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
  ids = tokenizer(['a red circle'])['input_ids'][0]
  assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 5, ids  # Real BPE ids, not one id for everything.
  return tokenizer


def build_pipeline(directory: str, tokenizer, prediction_type: str = 'epsilon', seed: int = 0) -> str:
  """A random-weight SD-like pipeline saved with save_pretrained (model_index.json + the five components)."""
  torch.manual_seed(seed)
  unet = perturb(diffusers.UNet2DConditionModel(**TINY_UNET), seed)
  vae = perturb(diffusers.AutoencoderKL(**TINY_VAE), seed + 1)
  text = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)), seed + 2)
  scheduler = diffusers.DDIMScheduler(
    beta_schedule='scaled_linear',
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type=prediction_type,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
  )
  pipeline = diffusers.StableDiffusionPipeline(
    vae=vae,
    text_encoder=text,
    tokenizer=tokenizer,
    unet=unet,
    scheduler=scheduler,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  pipeline.save_pretrained(directory)
  return directory


@pytest.fixture(scope='session')
def sd_pipeline_dir(tmp_path_factory, clip_tokenizer) -> str:
  return build_pipeline(str(tmp_path_factory.mktemp('tiny_sd')), clip_tokenizer)


def nchw(x) -> 'torch.Tensor':
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(x: 'torch.Tensor') -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope='session')
def ref() -> types.SimpleNamespace:
  """The reference stack and helpers: torch, diffusers, transformers, perturb, nchw, nhwc, build_pipeline."""
  _require_reference()
  return types.SimpleNamespace(
    torch=torch,
    diffusers=diffusers,
    transformers=transformers,
    perturb=perturb,
    nchw=nchw,
    nhwc=nhwc,
    build_pipeline=build_pipeline,
    TINY_UNET=TINY_UNET,
    TINY_VAE=TINY_VAE,
    TINY_TEXT=TINY_TEXT,
  )
