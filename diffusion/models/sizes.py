"""The one rule for how much a VAE or U-Net with `n` levels shrinks an image: 2 ** (n - 1) along each side."""

from collections.abc import Sized


def downsample_factor(block_out_channels: Sized) -> int:
  """Input pixels per output pixel along each side of a network with one level per entry (one halving between
  consecutive levels)."""
  return 2 ** (len(block_out_channels) - 1)
