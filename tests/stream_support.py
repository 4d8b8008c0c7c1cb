"""Helpers of the streamed-source tests (webdataset tar shards, parquet files): images to write, pipelines to read
them through, and the 2-process run of tests/data/stream_worker.py."""

import io
import json
import os
import socket
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image

from diffusion.data import pipeline, tokenizer
from support import device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'data', 'stream_worker.py')
MAX_LENGTH = 8


def encoded_image(i: int, fmt: str = 'PNG') -> bytes:
  """A small noisy image of a size that varies with i (so resize and crop are exercised), encoded as `fmt`."""
  rng = np.random.default_rng(i)
  array = rng.integers(0, 256, (12 + i % 5, 10 + (3 * i) % 7, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def caption(i: int) -> str:
  return f'item {i}'


def word_tokenizer():
  return tokenizer.build_word_tokenizer([caption(i) for i in range(100)], MAX_LENGTH)


def data_config(name: str, section: dict, **overrides) -> ml_collections.ConfigDict:
  """A data config of source `name` with its `data.<name>` section; top-level overrides."""
  config = ml_collections.ConfigDict(
    dict(
      name=name,
      data_dir='',
      image_size=8,
      image_key='image',
      caption_key='caption',
      train_split='train',
      eval_split='validation',
      random_crop=True,
      random_flip=False,
      max_text_length=MAX_LENGTH,
      worker_count=0,
      **{name: section},
    )
  )
  config.update(overrides)
  return config


def read_all(config, tok, **kwargs) -> tuple[list[str], np.ndarray, object]:
  """(captions, images, stats) of one pass (no shuffle unless asked, every sample, no dropped remainder)."""
  kwargs = {'shuffle': False, 'num_epochs': 1, 'drop_remainder': False, 'seed': 0, 'batch_size': 3, **kwargs}
  loader = pipeline.create_image_pipeline(config, 'train', tokenizer=tok, **kwargs)
  captions, images = [], []
  for batch in loader:
    captions += tok.batch_decode(batch['input_ids'], skip_special_tokens=True)
    images.append(batch['image'])
  return captions, np.concatenate(images), loader.data_stats


def batches(config, tok, n: int, seed: int = 0, state=None, batch_size: int = 2) -> tuple[list, object]:
  """The captions and images of `n` batches of the endless shuffled stream (from `state` if given), and the
  iterator's state after them, through JSON as the checkpoint stores it."""
  it = iter(pipeline.create_image_pipeline(config, 'train', tokenizer=tok, batch_size=batch_size, seed=seed))
  if state is not None:
    it.set_state(state)
  out = []
  for _ in range(n):
    batch = next(it)
    out.append((tok.batch_decode(batch['input_ids'], skip_special_tokens=True), batch['image']))
  return out, json.loads(json.dumps(it.get_state()))


def assert_same_batches(a: list, b: list) -> None:
  assert [c for c, _ in a] == [c for c, _ in b]
  for (_, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(x, y)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_two_processes(config: ml_collections.ConfigDict, tmp_path) -> list[dict]:
  """tests/data/stream_worker.py on 2 local processes (jax.distributed on 127.0.0.1); each one's results."""
  config_path = str(tmp_path / 'config.json')
  with open(config_path, 'w') as f:
    json.dump(config.to_dict(), f)
  env = device_env(None)
  port, outs = _free_port(), [str(tmp_path / f'out{i}.json') for i in range(2)]
  procs = [
    subprocess.Popen(
      [sys.executable, WORKER, config_path, outs[i], str(i), '2', str(port)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    for proc in procs:
      _, err = proc.communicate(timeout=300)
      assert proc.returncode == 0, err[-3000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  results = []
  for out in outs:
    with open(out) as f:
      results.append(json.load(f))
  return results
