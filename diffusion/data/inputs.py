"""The input pipeline of a data config: the dataset's images, or a latent cache where the config names one."""

import grain
import ml_collections

from diffusion.data import latent_cache, pipeline


def create_input_pipeline(
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  tokenizer,
  batch_size: int,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  drop_remainder: bool = True,
) -> grain.DataLoader | grain.IterDataset:
  """This host's batches of `split` (`batch_size` per host; `num_epochs=None` repeats forever).

  With `data_config.latent_cache` set (stage 2), the training split (and any other split the cache holds) is read
  from the precomputed latents: batches then carry `latent_mean` / `latent_logvar` in place of `image`, in the same
  order, with the same captions and flips (see `diffusion.data.latent_cache`). Otherwise see
  `pipeline.create_image_pipeline` (a grain `IterDataset` for the streamed sources, webdataset and parquet).
  """
  kwargs = dict(
    tokenizer=tokenizer,
    batch_size=batch_size,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    process_index=process_index,
    process_count=process_count,
    drop_remainder=drop_remainder,
  )
  cache_dir = data_config.get('latent_cache', '')
  if cache_dir and tokenizer is not None:
    if split == data_config.train_split or latent_cache.has_split(cache_dir, split):
      return latent_cache.create_cached_pipeline(data_config, split, **kwargs)
  return pipeline.create_image_pipeline(data_config, split, **kwargs)
