"""Input pipelines, the embedded shapes dataset, tokenizers and the shapes caption oracle.

Modules (import the one you need; this package imports nothing heavy by itself):
  shapes       scene sampling, rendering and captions (NumPy only)
  tfds_shapes  the shapes dataset as a TFDS ArrayRecord builder, prepared locally
  oracle       reads which coloured shapes an image shows; scores images against captions
  tokenizer    word-level tokenizer, save/load (also hub tokenizers), tokenize
  folder       image folder + captions file as a data source
  shards       shard lists from brace patterns, globs and list files; per-process shares
  transforms   decode, count, resize/crop/flip, batch, tokenize (every pipeline's transforms)
  streaming    streamed pipelines over shards (grain interleave + window shuffle; resumable)
  webdataset   tar shards (data.name='webdataset')
  parquet      parquet files (data.name='parquet'; pyarrow)
  pipeline     create_data_source / create_image_pipeline (grain; deterministic, resumable)
  latent_cache reading precomputed VAE posteriors (written by diffusion.latent_cache_writer)
  inputs       create_input_pipeline: the images, or the latent cache where the config names one
"""
