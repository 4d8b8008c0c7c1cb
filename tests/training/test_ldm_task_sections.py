"""Stage 2 takes the VAE's architecture from the workdir it was built on, but the attention kernel from its own run."""

import ml_collections

from diffusion.training import ldm_task


def test_vae_section_keeps_the_runs_attention_kernel():
  built_on = ml_collections.ConfigDict({'latent_channels': 4, 'block_out_channels': (32, 64), 'attention': 'xla'})
  run = ml_collections.ConfigDict({'latent_channels': 8, 'attention': 'cudnn'})
  section = ldm_task._vae_section(built_on, run)
  assert section.latent_channels == 4 and tuple(section.block_out_channels) == (32, 64)
  assert section.attention == 'cudnn'
  assert built_on.attention == 'xla'  # The source is not modified.


def test_vae_section_of_an_older_workdir_without_the_key():
  section = ldm_task._vae_section(ml_collections.ConfigDict({'latent_channels': 4}), ml_collections.ConfigDict())
  assert section.attention == 'auto'
