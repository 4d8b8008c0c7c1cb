"""CLIP score: both towers against transformers' CLIPModel, preprocessing against CLIPImageProcessor (PIL and
torchvision backends), the score against torchmetrics' CLIPScore given either processor, the evaluation job's metric
and the command line.

The reference is a random-weight tiny `transformers.CLIPModel` saved with save_pretrained, next to a CLIP BPE
tokenizer built from a vocabulary written here (bytes + a few merges) and a preprocessor_config.json: no downloads.
"""

import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('torchmetrics')
from absl import flags  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms.v2 import functional as tvF  # noqa: E402
from transformers.models.clip.image_processing_clip import CLIPImageProcessor  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from diffusion.errors import UserError  # noqa: E402
from diffusion.evaluation import clip_preprocessing  # noqa: E402
from diffusion.evaluation import clip_score as clip_lib  # noqa: E402
from diffusion.evaluation.base import METRICS, EvalContext  # noqa: E402
from diffusion.interop import clip as clip_interop  # noqa: E402
from diffusion.interop import files  # noqa: E402
from eval import clip_score as clip_cli  # noqa: E402
from support import write_clip_bpe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE_SIZE = 32
CAPTIONS = ['a red circle', 'blue', 'a blue circle and a red circle', 'red red red', 'circle', 'a cat']
SIZES = [(40, 57), (100, 33), (32, 32), (64, 64), (17, 90), (300, 200)]  # (H, W): up- and downsampling, crops.
PROCESSORS = {'pil': CLIPImageProcessorPil, 'torchvision': CLIPImageProcessor}  # transformers' two backends.


def _write_tokenizer(directory: str) -> transformers.CLIPTokenizer:
  merges = ['r e', 're d</w>', 'c i', 'ci r', 'cir c', 'l e</w>', 'circ le</w>', 'b l', 'bl u', 'blu e</w>']
  vocab = write_clip_bpe(directory, merges)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
  ids = tokenizer(['a red circle'])['input_ids'][0]
  assert ids == [
    len(vocab) - 2,
    vocab.index('a</w>'),
    vocab.index('red</w>'),
    vocab.index('circle</w>'),
    len(vocab) - 1,
  ], ids  # Real BPE ids (not one id for every token).
  return tokenizer


@pytest.fixture(scope='module')
def clip_dir(tmp_path_factory) -> str:
  """A tiny random CLIPModel (ViT 32 px, patch 8, projection 16), its tokenizer and preprocessor config."""
  directory = str(tmp_path_factory.mktemp('tiny_clip'))
  tokenizer = _write_tokenizer(directory)
  vocab = len(tokenizer)
  config = transformers.CLIPConfig(
    text_config=dict(
      vocab_size=vocab,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=2,
      max_position_embeddings=77,
      hidden_act='quick_gelu',
      eos_token_id=vocab - 1,
      bos_token_id=vocab - 2,
      pad_token_id=vocab - 1,
    ),
    vision_config=dict(
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=3,
      image_size=IMAGE_SIZE,
      patch_size=8,
      hidden_act='gelu',
    ),
    projection_dim=16,
  )
  torch.manual_seed(0)
  model = transformers.CLIPModel(config)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():  # Norm scales / biases off 1 / 0, so that a swapped or skipped tensor shows.
    for param in model.parameters():
      if param.ndim == 1:
        param.add_(0.1 * torch.randn(param.shape, generator=gen))
  model.eval().save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  CLIPImageProcessorPil(
    size={'shortest_edge': IMAGE_SIZE}, crop_size={'height': IMAGE_SIZE, 'width': IMAGE_SIZE}
  ).save_pretrained(directory)
  return directory


@pytest.fixture(scope='module')
def reference(clip_dir):
  return transformers.CLIPModel.from_pretrained(clip_dir).eval()


@pytest.fixture(scope='module')
def scorers(clip_dir):
  """backend -> CLIPScorer, built on first use."""
  built = {}

  def get(backend: str = 'pil') -> clip_lib.CLIPScorer:
    if backend not in built:
      built[backend] = clip_lib.CLIPScorer(clip_dir, resize_backend=backend)
    return built[backend]

  return get


def _images(seed: int = 0, sizes=SIZES) -> list[np.ndarray]:
  """Smooth random images (a noisy colour gradient), so resampling filters matter and embeddings differ."""
  rng = np.random.default_rng(seed)
  out = []
  for h, w in sizes:
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack(
      [np.sin(6 * xx + c * rng.uniform(0, 6)) * np.cos(4 * yy * rng.uniform(0.5, 2)) for c in range(3)], -1
    )
    out.append(np.clip(127.5 * (base + 1) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
  return out


def _nchw(processing, images) -> np.ndarray:
  return np.stack([processing(i) for i in images]).transpose(0, 3, 1, 2)


@pytest.mark.parametrize('backend', ['pil', 'torchvision'])
def test_preprocessing_matches_clip_image_processor(clip_dir, scorers, backend):
  reference = PROCESSORS[backend]
  images = _images()
  expected = reference.from_pretrained(clip_dir)(images=images, return_tensors='np')['pixel_values']
  got = scorers(backend).pixel_values(images).transpose(0, 3, 1, 2)
  assert got.shape == expected.shape == (len(images), 3, IMAGE_SIZE, IMAGE_SIZE)
  assert np.abs(got - expected).max() <= 1e-6
  # No preprocessor config: CLIP's defaults (shortest side 224, crop 224), including the padding of a small image.
  defaults = clip_preprocessing.ImageProcessing(resize_backend=backend)
  for image in _images(1, [(230, 300), (10, 7)]):
    want = reference()(images=[image], return_tensors='np')['pixel_values'][0]
    assert np.abs(defaults(image).transpose(2, 0, 1) - want).max() <= 1e-6
  # A crop larger than the resize pads with zeros, centred (the backends put an odd pixel on opposite sides).
  padded = clip_preprocessing.ImageProcessing(size=16, crop_size=(21, 25), resize_backend=backend)
  want = reference(size={'shortest_edge': 16}, crop_size={'height': 21, 'width': 25})(
    images=images[:2], return_tensors='np'
  )['pixel_values']
  assert np.abs(_nchw(padded, images[:2]) - want).max() <= 1e-6


def test_torchvision_resize_is_torchvision_bit_for_bit():
  rng = np.random.default_rng(7)
  modes = {
    clip_preprocessing.BICUBIC: tvF.InterpolationMode.BICUBIC,
    clip_preprocessing.BILINEAR: tvF.InterpolationMode.BILINEAR,
  }
  cases = [
    ((40, 57), (32, 45)),
    ((300, 200), (48, 32)),
    ((17, 90), (32, 169)),
    ((64, 64), (64, 21)),
    ((5, 3), (224, 150)),
    ((333, 100), (100, 333)),
  ]
  for (h, w), (oh, ow) in cases:
    image = _images(int(rng.integers(1000)), [(h, w)])[0]
    image[:2] = rng.integers(0, 256, (2, w, 3))  # Hard edges: clamping at 0 and 255 happens.
    for resample, mode in modes.items():
      want = (
        tvF.resize(torch.from_numpy(image).permute(2, 0, 1).contiguous(), [oh, ow], interpolation=mode, antialias=True)
        .permute(1, 2, 0)
        .numpy()
      )
      got = clip_preprocessing.torchvision_resize(image, oh, ow, resample)
      assert got.dtype == np.uint8 and np.array_equal(got, want), ((h, w), (oh, ow), resample)
  with pytest.raises(UserError, match='resample=1 is not supported'):
    clip_preprocessing.ImageProcessing(resample=1, resize_backend='torchvision')
  with pytest.raises(UserError, match="resize_backend='cv2'.*pil, torchvision"):
    clip_preprocessing.ImageProcessing(resize_backend='cv2')


def test_the_backends_differ_only_where_an_image_is_resized(scorers):
  resized, unresized = _images(8, [(57, 41), (IMAGE_SIZE, IMAGE_SIZE)])
  pil, torchvision = scorers('pil'), scorers('torchvision')
  a, b = pil.pixel_values([resized]), torchvision.pixel_values([resized])
  grey_level = 1 / 255 / max(clip_preprocessing.OPENAI_CLIP_STD)
  assert np.abs(a - b).max() >= 0.99 * grey_level  # At least one pixel one grey level apart ...
  assert np.mean(np.abs(a - b) > 1e-3) < 0.2  # ... but most equal: the same filter, another fixed-point precision.
  assert np.abs(pil.pixel_values([unresized]) - torchvision.pixel_values([unresized])).max() <= 1e-5
  assert abs(pil.scores([resized], CAPTIONS[:1])[0] - torchvision.scores([resized], CAPTIONS[:1])[0]) > 1e-5


def test_embeddings_match_transformers(scorers, reference):
  scorer = scorers('pil')
  images = _images(2)
  pixels = scorer.pixel_values(images)
  with torch.no_grad():
    image_ref = reference.get_image_features(
      pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    ).pooler_output.numpy()
    tokens = transformers.AutoTokenizer.from_pretrained(scorer.model_dir)(CAPTIONS, padding=True, return_tensors='pt')
    text_ref = reference.get_text_features(**tokens).pooler_output.numpy()
  image_emb, text_emb = scorer.image_embeddings(images), scorer.text_embeddings(CAPTIONS)
  assert image_emb.shape == image_ref.shape == (len(images), 16)
  assert np.abs(image_emb - image_ref).max() <= 1e-4
  assert np.abs(text_emb - text_ref).max() <= 1e-4
  assert np.std(image_emb, axis=0).mean() > 0.05 and np.std(text_emb, axis=0).mean() > 0.05  # Input-dependent.
  per_pair = scorer.scores(images, CAPTIONS)
  cos = torch.nn.functional.cosine_similarity(torch.from_numpy(image_ref), torch.from_numpy(text_ref)).numpy()
  assert np.abs(per_pair - 100 * cos).max() <= 1e-3


def test_load_clip_reads_the_weights_once(clip_dir):
  with mock.patch.object(files, 'read_state_dict', wraps=files.read_state_dict) as read:
    towers = clip_interop.load_clip(clip_dir)
  assert read.call_count == 1
  assert (towers.vision.projection_dim, towers.text.projection_dim) == (16, 16)
  vision, _ = clip_interop.load_vision_encoder(clip_dir)
  assert vision == towers.vision


class _Features(torch.nn.Module):
  """transformers 5's get_*_features return model outputs; torchmetrics 1.9 expects tensors."""

  def __init__(self, model):
    super().__init__()
    self.model, self.config = model, model.config

  def get_image_features(self, *args, **kwargs):
    return self.model.get_image_features(*args, **kwargs).pooler_output

  def get_text_features(self, *args, **kwargs):
    return self.model.get_text_features(*args, **kwargs).pooler_output


def _torchmetrics_score(model, clip_dir, images, captions, backend='pil') -> float:
  from torchmetrics.multimodal import CLIPScore

  processor = transformers.CLIPProcessor.from_pretrained(clip_dir, backend=backend)
  assert processor.image_processor.backend == backend
  metric = CLIPScore(model_name_or_path=lambda: (_Features(model), processor))
  half = len(images) // 2
  for lo, hi in ((0, half), (half, len(images))):  # Two updates: the running sum and count.
    metric.update(
      [torch.from_numpy(np.ascontiguousarray(i.transpose(2, 0, 1))) for i in images[lo:hi]], list(captions[lo:hi])
    )
  return float(metric.compute())


def _matched_pairs(scorer, images, worst=False):
  """Each image with its best (worst) caption: positive scores, so the clamp at 0 hides nothing (or negative).
  A random CLIP's text embeddings share a direction, so one caption may be best for several images."""
  matrix = clip_lib.pair_scores(
    np.repeat(scorer.image_embeddings(images), len(CAPTIONS), 0),
    np.tile(scorer.text_embeddings(CAPTIONS), (len(images), 1)),
  )
  matrix = matrix.reshape(len(images), len(CAPTIONS))
  return [CAPTIONS[j] for j in (matrix.argmin(1) if worst else matrix.argmax(1))]


@pytest.mark.parametrize('backend', ['pil', 'torchvision'])
def test_clip_score_matches_torchmetrics(clip_dir, scorers, reference, backend):
  scorer, other = scorers(backend), scorers('torchvision' if backend == 'pil' else 'pil')
  images = _images(3)
  captions = _matched_pairs(scorer, images)
  ours = clip_lib.clip_score(scorer.scores(images, captions))
  theirs = _torchmetrics_score(reference, clip_dir, images, captions, backend)
  assert ours > 1.0 and abs(ours - theirs) <= 2e-5, (ours, theirs)
  # Controls: the parity tolerance is far below what the other backend, a wrong normalisation or resize filter
  # changes.
  assert abs(clip_lib.clip_score(other.scores(images, captions)) - theirs) > 1e-3  # 3.2e-3 here.
  for wrong in (dict(image_mean=(0.5,) * 3, image_std=(0.5,) * 3), dict(resample=Image.BILINEAR)):
    processing = clip_preprocessing.ImageProcessing(
      size=IMAGE_SIZE, crop_size=(IMAGE_SIZE, IMAGE_SIZE), resize_backend=backend, **wrong
    )
    pixels = np.stack([processing(i) for i in images])
    per_pair = clip_lib.pair_scores(scorer.image_embeddings_from_pixels(pixels), scorer.text_embeddings(captions))
    assert abs(clip_lib.clip_score(per_pair) - theirs) > 0.05, wrong
  # ... and a shuffled pairing changes the per-pair scores.
  per_pair = scorer.scores(images, CAPTIONS)
  assert np.abs(scorer.scores(images, CAPTIONS[1:] + CAPTIONS[:1]) - per_pair).max() > 0.1
  # Each image with its worst caption: a negative mean, which both clamp to 0 after averaging.
  worst = _matched_pairs(scorer, images, worst=True)
  assert np.mean(scorer.scores(images, worst)) < 0
  assert clip_lib.clip_score(scorer.scores(images, worst)) == 0.0
  assert _torchmetrics_score(reference, clip_dir, images, worst, backend) == 0.0


def test_metric_for_the_evaluation_job(clip_dir, scorers):
  images = _images(4, [(IMAGE_SIZE + 9, IMAGE_SIZE)] * 6)  # Resized: the backend matters.
  for backend in ('pil', 'torchvision'):
    options = {'clip_model': clip_dir, **({'resize_backend': backend} if backend != 'pil' else {})}
    metric = METRICS.get('clip')(EvalContext('unused', None, None, 'none', options=options))
    for _ in range(2):  # reset() forgets the previous checkpoint's pairs.
      metric.reset()
      metric.update(np.stack(images[:4]), CAPTIONS[:4])
      metric.update(np.stack(images[4:]), CAPTIONS[4:])
      expected = max(float(np.mean(scorers(backend).scores(images, CAPTIONS))), 0.0)
      assert metric.result() == {'clip_score': pytest.approx(expected, abs=1e-9)}
    info = metric.describe()
    assert info['clip_model'] == os.path.abspath(clip_dir) and info['resize_backend'] == backend
  metric.reset()
  with pytest.raises(UserError, match='no image-caption pairs'):
    metric.result()
  with pytest.raises(UserError, match='--clip_model'):
    METRICS.get('clip')(EvalContext('unused', None, None, 'none'))
  with pytest.raises(UserError, match='does not exist.*CLIPModel directory'):
    METRICS.get('clip')(EvalContext('unused', None, None, 'none', options={'clip_model': clip_dir + '_missing'}))
  with pytest.raises(UserError, match="resize_backend='bilinear'.*pil, torchvision"):
    METRICS.get('clip')(
      EvalContext('unused', None, None, 'none', options={'clip_model': clip_dir, 'resize_backend': 'bilinear'})
    )


def _folder(tmp_path, images, broken=()):
  folder = tmp_path / 'images'
  folder.mkdir()
  for i, image in enumerate(images):
    if i in broken:
      (folder / f'{i:04d}.png').write_bytes(b'not a png')
    else:
      Image.fromarray(image).save(folder / f'{i:04d}.png')
  return str(folder)


def _captions(tmp_path, captions):
  path = tmp_path / 'captions.txt'
  path.write_text('\n'.join(captions) + '\n')
  return str(path)


def _cli_score(stdout: str) -> float:
  lines = [line for line in stdout.splitlines() if line.startswith('CLIP score: ')]
  assert len(lines) == 1, stdout
  return float(lines[0].split(': ')[1])


def test_cli_scores_a_folder_and_skips_unreadable_images(tmp_path, clip_dir, scorers):
  images = _images(5, SIZES[:5])
  folder, captions = _folder(tmp_path, images, broken={2}), _captions(tmp_path, CAPTIONS[:5])
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'eval.clip_score',
      '--images',
      folder,
      '--captions',
      captions,
      '--model',
      clip_dir,
      '--batch_size',
      '2',
      '--resize_backend=torchvision',
      '--per_pair',
      str(tmp_path / 'pairs.tsv'),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  kept = [0, 1, 3, 4]  # Image 2 is unreadable: it and its caption are dropped.
  per_pair = scorers('torchvision').scores([images[i] for i in kept], [CAPTIONS[i] for i in kept])
  assert _cli_score(result.stdout) == pytest.approx(max(float(np.mean(per_pair)), 0.0), abs=1e-6)
  assert 'skipped 1 unreadable' in result.stderr and 'images/s' in result.stderr, result.stderr
  written = (tmp_path / 'pairs.tsv').read_text().splitlines()
  assert [line.split('\t')[0] for line in written] == [f'{i:04d}.png' for i in kept]
  assert np.allclose([float(line.split('\t')[1]) for line in written], per_pair, atol=1e-5)


@pytest.fixture
def main():
  """eval.clip_score's main in this process; the flags it defines are removed afterwards (as between processes)."""

  def call(*argv: str) -> None:
    before = set(flags.FLAGS)
    try:
      clip_cli.main(['eval.clip_score', *argv])
    finally:
      flags.FLAGS.unparse_flags()
      for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)

  return call


def test_cli_in_process_with_the_default_backend(tmp_path, capsys, clip_dir, scorers, main):
  images = _images(9, SIZES[:3])
  folder, captions = _folder(tmp_path, images), _captions(tmp_path, CAPTIONS[:3])
  main('--images', folder, '--captions', captions, '--clip_model', clip_dir, '--batch-size=2')  # Old spelling.
  expected = clip_lib.clip_score(scorers('pil').scores(images, CAPTIONS[:3]))
  assert _cli_score(capsys.readouterr().out) == pytest.approx(expected, abs=1e-6)


def _main_error(capsys, main, *argv) -> str:
  with pytest.raises(SystemExit) as exit_info:
    main(*argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1 and 'Traceback' not in err, err
  return lines[0]


def test_cli_user_errors(tmp_path, capsys, clip_dir, main):
  folder, captions = _folder(tmp_path, _images(6, SIZES[:3])), _captions(tmp_path, CAPTIONS[:2])
  ok = ('--images', folder, '--captions', captions)
  line = _main_error(capsys, main, *ok, '--model', clip_dir)
  assert '3 image files' in line and '2 captions' in line
  line = _main_error(capsys, main, *ok, '--model', str(tmp_path / 'nope'))
  assert 'does not exist' in line and 'config.json' in line and 'tokenizer' in line
  assert 'no config.json' in _main_error(capsys, main, *ok, '--clip_model', str(tmp_path))
  assert '--clip_model (or --model) is required' in _main_error(capsys, main, *ok)
  assert '--captions is required' in _main_error(capsys, main, '--images', folder, '--model', clip_dir)
  line = _main_error(capsys, main, *ok, '--model', clip_dir, '--resize_backend', 'bilinear')
  assert 'resize_backend' in line and 'pil' in line and 'torchvision' in line
  assert '--batch_size must be >= 1' in _main_error(capsys, main, *ok, '--model', clip_dir, '--batch_size', '0')
  assert 'unexpected argument' in _main_error(capsys, main, *ok, '--model', clip_dir, 'stray')
  assert 'is not a folder' in _main_error(
    capsys, main, '--images', captions, '--captions', captions, '--model', clip_dir
  )


@pytest.mark.slow
def test_evaluation_job_with_clip(ldm_workdir, tmp_path, clip_dir):
  import shutil

  from eval import run as run_lib

  workdir = str(tmp_path / 'ldm')
  shutil.copytree(ldm_workdir, workdir, ignore=shutil.ignore_patterns('eval', 'wandb'))
  fast = dict(num_reference=8, batch_size=4, wandb_mode='disabled')
  with pytest.raises(UserError, match='--clip_model'):
    run_lib.run(workdir, ['clip'], 4, step=1, **fast)
  records = run_lib.run(workdir, ['clip', 'oracle'], 4, step=1, metric_options={'clip_model': clip_dir}, **fast)
  metrics = records[0]['metrics']
  assert 0.0 <= metrics['clip_score'] <= 100.0 and 'oracle_caption_accuracy' in metrics
  assert records[0]['metrics_info']['clip']['clip_model'] == os.path.abspath(clip_dir)
  with open(run_lib.eval_path(workdir, 1)) as f:
    assert json.load(f)['metrics']['clip_score'] == metrics['clip_score']
