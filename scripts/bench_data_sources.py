r"""Input-pipeline images/s of the same JPEG images as an image folder, webdataset tar shards and parquet files.

  python scripts/bench_data_sources.py [--num_images 512] [--source_size 320] [--image_size 256] [--batch_size 32]
                                       [--num_shards 8] [--cycle_length 8] [--repeats 2] [--root DIR]

Writes --num_images JPEG images (--source_size px on the longer side, 3:4) once in each layout, then reads one
shuffled epoch of each through `pipeline.create_image_pipeline` (decode, resize, random crop, batch, tokenize) on
this process, --repeats times in alternation (load drift on a shared machine hits every source); the best pass of
each counts, timed from building the pipeline to its last batch. The folder source reads with grain's DataLoader
(4 reader threads); the streamed sources with `cycle_length` reader threads (one per shard read at once).
"""

import argparse
import io
import json
import os
import tarfile
import tempfile
import time

import numpy as np

from diffusion import results
from diffusion.errors import UserError, user_errors_exit


def _images(num: int, size: int) -> list[bytes]:
  """Smooth gradients plus noise (a JPEG of typical decode cost), encoded at quality 90."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  h, w = size * 3 // 4, size
  y, x = np.mgrid[0:h, 0:w]
  out = []
  for i in range(num):
    base = np.stack([(x * (i % 7 + 1)) % 256, (y * (i % 5 + 1)) % 256, (x + y + 40 * i) % 256], -1)
    array = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format='JPEG', quality=90)
    out.append(buf.getvalue())
  return out


def _write(root: str, images: list[bytes], num_shards: int) -> dict[str, dict]:
  """The three layouts of the same images; their data-config overrides."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  folder = os.path.join(root, 'folder')
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'metadata.jsonl'), 'w') as f:
    for i, data in enumerate(images):
      with open(os.path.join(folder, f'{i:06d}.jpg'), 'wb') as g:
        g.write(data)
      f.write(json.dumps({'file_name': f'{i:06d}.jpg', 'text': f'image {i % 10}'}) + '\n')
  per_shard = -(-len(images) // num_shards)
  for s in range(num_shards):
    chunk = range(s * per_shard, min((s + 1) * per_shard, len(images)))
    with tarfile.open(os.path.join(root, f'{s:05d}.tar'), 'w') as tar:
      for i in chunk:
        for name, data in ((f'{i:06d}.jpg', images[i]), (f'{i:06d}.txt', f'image {i % 10}'.encode())):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    rows = [{'image': {'bytes': images[i], 'path': f'{i:06d}.jpg'}, 'text': f'image {i % 10}'} for i in chunk]
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, f'{s:05d}.parquet'), row_group_size=64)
  return {
    'folder': {'name': 'folder', 'folder.path': folder},
    'webdataset': {'name': 'webdataset', 'webdataset.urls': os.path.join(root, '*.tar')},
    'parquet': {'name': 'parquet', 'parquet.files': os.path.join(root, '*.parquet')},
  }


def _config(args, overrides: dict):
  from configs import ldm_base  # pylint: disable=import-outside-toplevel

  data = ldm_base.get_config('tiny').data
  data.image_size, data.random_crop = args.image_size, True
  data.webdataset.cycle_length = data.parquet.cycle_length = args.cycle_length
  for key, value in overrides.items():
    node, *path = data, *key.split('.')
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = value
  return data


def _epoch_seconds(data, tokenizer, batch_size: int) -> tuple[float, int]:
  """(seconds for one shuffled epoch, from building the pipeline to its last batch; images in it). Start-up counts:
  a streamed source decodes its first shuffle window before the first batch."""
  from diffusion.data import pipeline  # pylint: disable=import-outside-toplevel

  start, n = time.perf_counter(), 0
  loader = pipeline.create_image_pipeline(
    data, 'train', tokenizer=tokenizer, batch_size=batch_size, seed=0, num_epochs=1
  )
  for batch in loader:
    n += len(batch['image'])
  return time.perf_counter() - start, n


@user_errors_exit
def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--num_images', type=int, default=512)
  parser.add_argument('--source_size', type=int, default=320, help='longer side of the stored JPEGs (3:4)')
  parser.add_argument('--image_size', type=int, default=256, help='data.image_size (resize + random crop)')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--num_shards', type=int, default=8, help='tar shards and parquet files')
  parser.add_argument('--cycle_length', type=int, default=8, help='data.webdataset/parquet.cycle_length')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--root', default='', help='scratch directory (default: a temporary one)')
  parser.add_argument('--record', default=None, help='default docs/results/bench_data_sources.json')
  args = parser.parse_args()
  if min(args.num_images, args.batch_size, args.num_shards, args.cycle_length, args.repeats) < 1:
    raise UserError('--num_images, --batch_size, --num_shards, --cycle_length and --repeats must be >= 1')
  if args.num_images < args.batch_size:
    raise UserError('--num_images must be at least --batch_size')
  from diffusion.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel

  root = args.root or tempfile.mkdtemp(prefix='bench_data_sources_')
  load_at_start = results.load_average()
  print(f'load average at start: {load_at_start} on {os.cpu_count()} cores; scratch {root}', flush=True)
  layouts = _write(root, _images(args.num_images, args.source_size), args.num_shards)
  tokenizer = tokenizer_lib.build_word_tokenizer([f'image {i}' for i in range(10)], 16)
  best = {name: None for name in layouts}
  for _ in range(args.repeats):
    for name, overrides in layouts.items():
      seconds, n = _epoch_seconds(_config(args, overrides), tokenizer, args.batch_size)
      rate = n / seconds
      best[name] = rate if best[name] is None else max(best[name], rate)
      print(f'{name}: {rate:.1f} images/s ({n} images in {seconds:.2f} s)', flush=True)
  rows = [{'source': name, 'images_per_s': rate} for name, rate in best.items()]
  print(f'load average at end: {results.load_average()}', flush=True)
  results.write_record(
    'bench_data_sources',
    rows,
    path=args.record,
    load_at_start=load_at_start,
    settings={k: v for k, v in vars(args).items() if k not in ('root', 'record')},
  )


if __name__ == '__main__':
  main()
