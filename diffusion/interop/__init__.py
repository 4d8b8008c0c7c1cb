"""Weights from and to the PyTorch ecosystem: diffusers U-Nets and VAEs, transformers CLIP text encoders (whole
pipeline directories <-> workdirs: `diffusion.training.pipeline_io`).

  unet, params = load_unet('path/to/sd/unet')          # or the pipeline directory, or a hub id
  out = unet.apply({'params': params}, z_t, t, context)  # NHWC, t in diffusers units (0 ... 999)
  vae, vae_params = load_vae(path)                       # apply(..., x, method='encode') -> (mean, logvar)
  clip, clip_params = load_text_encoder(path)            # apply(..., ids) -> (last_hidden, pooled)
  t5, t5_params = load_text_encoder('path/to/t5')        # apply(..., ids, mask) -> TextEncoderOutput (T5EncoderModel)
  loras = load_lora('pytorch_lora_weights.safetensors')  # diffusers / kohya LoRA -> diffusion.lora.merge

Conversions are table-driven (`naming`), all or nothing: a load fails listing missing, left-over and
mis-shaped tensors rather than filling part of a model.
"""

from diffusion.interop.loaders import (
  load_text_encoder,
  load_text_encoder_config,
  load_unet,
  load_unet_config,
  load_vae,
  load_vae_config,
  save_text_encoder,
  save_unet,
  save_vae,
)
from diffusion.interop.lora import load_lora, save_lora

__all__ = [
  'load_text_encoder',
  'load_text_encoder_config',
  'load_unet',
  'load_unet_config',
  'load_vae',
  'load_vae_config',
  'load_lora',
  'save_text_encoder',
  'save_unet',
  'save_vae',
  'save_lora',
]
