"""CLIP score: both towers against transformers' CLIPModel, preprocessing against CLIPImageProcessor (PIL backend),
the score against torchmetrics' CLIPScore, the command line and the evaluation job's metric.

The reference is a random-weight tiny `transformers.CLIPModel` saved with save_pretrained, next to a CLIP BPE
tokenizer built from a vocabulary written here (bytes + a few merges) and a preprocessor_config.json: no downloads.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('torchmetrics')
from PIL import Image  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from diffusion.errors import UserError  # noqa: E402
from support import write_clip_bpe  # noqa: E402
from eval import clip_score  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE_SIZE = 32
CAPTIONS = ['a red circle', 'blue', 'a blue circle and a red circle', 'red red red', 'circle', 'a cat']
SIZES = [(40, 57), (100, 33), (32, 32), (64, 64), (17, 90), (300, 200)]  # (H, W): up- and downsampling, crops.


def _write_tokenizer(directory: str) -> transformers.CLIPTokenizer:
  merges = ['r e', 're d</w>', 'c i', 'ci r', 'cir c', 'l e</w>', 'circ le</w>', 'b l', 'bl u', 'blu e</w>']
  vocab = write_clip_bpe(directory, merges)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
  ids = tokenizer(['a red circle'])['input_ids'][0]
  assert ids == [len(vocab) - 2, vocab.index('a</w>'), vocab.index('red</w>'), vocab.index('circle</w>'),
                 len(vocab) - 1], ids  # Real BPE ids (not one id for every token).
  return tokenizer


@pytest.fixture(scope='module')
def clip_dir(tmp_path_factory) -> str:
  """A tiny random CLIPModel (ViT 32 px, patch 8, projection 16), its tokenizer and preprocessor config."""
  directory = str(tmp_path_factory.mktemp('tiny_clip'))
  tokenizer = _write_tokenizer(directory)
  vocab = len(tokenizer)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=77, hidden_act='quick_gelu',
                       eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=vocab - 1),
      vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                         image_size=IMAGE_SIZE, patch_size=8, hidden_act='gelu'),
      projection_dim=16)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():  # Norm scales / biases off 1 / 0, so that a swapped or skipped tensor shows.
    for param in model.parameters():
      if param.ndim == 1:
        param.add_(0.1 * torch.randn(param.shape, generator=gen))
  model.eval().save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  CLIPImageProcessorPil(size={'shortest_edge': IMAGE_SIZE},
                        crop_size={'height': IMAGE_SIZE, 'width': IMAGE_SIZE}).save_pretrained(directory)
  return directory


@pytest.fixture(scope='module')
def reference(clip_dir):
  return transformers.CLIPModel.from_pretrained(clip_dir).eval()


@pytest.fixture(scope='module')
def scorer(clip_dir):
  return clip_score.CLIPScorer(clip_dir)


def _images(seed: int = 0, sizes=SIZES) -> list[np.ndarray]:
  """Smooth random images (a noisy colour gradient), so resampling filters matter and embeddings differ."""
  rng = np.random.default_rng(seed)
  out = []
  for h, w in sizes:
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c * rng.uniform(0, 6)) * np.cos(4 * yy * rng.uniform(0.5, 2)) for c in range(3)],
                    -1)
    out.append(np.clip(127.5 * (base + 1) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
  return out


def test_preprocessing_matches_clip_image_processor(clip_dir, scorer):
  images = _images()
  expected = CLIPImageProcessorPil.from_pretrained(clip_dir)(images=images, return_tensors='np')['pixel_values']
  got = scorer.pixel_values(images).transpose(0, 3, 1, 2)
  assert got.shape == expected.shape == (len(images), 3, IMAGE_SIZE, IMAGE_SIZE)
  assert np.abs(got - expected).max() <= 1e-6
  # No preprocessor config: CLIP's defaults (shortest side 224, crop 224), including the padding of a small image.
  defaults, reference = clip_score.ImageProcessing(), CLIPImageProcessorPil()
  for image in _images(1, [(230, 300), (10, 7)]):
    want = reference(images=[image], return_tensors='np')['pixel_values'][0]
    assert np.abs(defaults(image).transpose(2, 0, 1) - want).max() <= 1e-6
  # A crop larger than the resize pads with zeros, centred, as transformers' center_crop.
  padded = clip_score.ImageProcessing(size=16, crop_size=(20, 24))
  want = CLIPImageProcessorPil(size={'shortest_edge': 16}, crop_size={'height': 20, 'width': 24})(
      images=images[:2], return_tensors='np')['pixel_values']
  assert np.abs(np.stack([padded(i) for i in images[:2]]).transpose(0, 3, 1, 2) - want).max() <= 1e-6


def test_embeddings_match_transformers(scorer, reference):
  images = _images(2)
  pixels = scorer.pixel_values(images)
  with torch.no_grad():
    image_ref = reference.get_image_features(
        pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).pooler_output.numpy()
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
  metric = CLIPScore(model_name_or_path=lambda: (_Features(model), processor))
  half = len(images) // 2
  for lo, hi in ((0, half), (half, len(images))):  # Two updates: the running sum and count.
    metric.update([torch.from_numpy(np.ascontiguousarray(i.transpose(2, 0, 1))) for i in images[lo:hi]],
                  list(captions[lo:hi]))
  return float(metric.compute())


def _matched_pairs(scorer, images, worst=False):
  """Each image with its best (worst) caption: positive scores, so the clamp at 0 hides nothing (or negative).
  A random CLIP's text embeddings share a direction, so one caption may be best for several images."""
  matrix = clip_score.pair_scores(np.repeat(scorer.image_embeddings(images), len(CAPTIONS), 0),
                                  np.tile(scorer.text_embeddings(CAPTIONS), (len(images), 1)))
  matrix = matrix.reshape(len(images), len(CAPTIONS))
  return [CAPTIONS[j] for j in (matrix.argmin(1) if worst else matrix.argmax(1))]


def test_clip_score_matches_torchmetrics(clip_dir, scorer, reference):
  images = _images(3)
  captions = _matched_pairs(scorer, images)
  ours = clip_score.clip_score(scorer.scores(images, captions))
  theirs = _torchmetrics_score(reference, clip_dir, images, captions)
  assert ours > 1.0 and abs(ours - theirs) <= 1e-3, (ours, theirs)
  # Controls: the parity tolerance is far below what a wrong normalisation or resize filter changes.
  for wrong in (dict(image_mean=(0.5,) * 3, image_std=(0.5,) * 3), dict(resample=Image.BILINEAR)):
    processing = clip_score.ImageProcessing(size=IMAGE_SIZE, crop_size=(IMAGE_SIZE, IMAGE_SIZE), **wrong)
    pixels = np.stack([processing(i) for i in images])
    per_pair = clip_score.pair_scores(scorer.image_embeddings_from_pixels(pixels), scorer.text_embeddings(captions))
    assert abs(clip_score.clip_score(per_pair) - theirs) > 0.05, wrong
  # ... and a shuffled pairing changes the per-pair scores.
  per_pair = scorer.scores(images, CAPTIONS)
  assert np.abs(scorer.scores(images, CAPTIONS[1:] + CAPTIONS[:1]) - per_pair).max() > 0.1
  # Each image with its worst caption: a negative mean, which both clamp to 0 after averaging.
  worst = _matched_pairs(scorer, images, worst=True)
  assert np.mean(scorer.scores(images, worst)) < 0
  assert clip_score.clip_score(scorer.scores(images, worst)) == 0.0
  assert _torchmetrics_score(reference, clip_dir, images, worst) == 0.0


def test_metric_for_the_evaluation_job(clip_dir, scorer):
  from eval import metrics

  context = metrics.EvalContext('unused', None, None, 'none', options={'clip_model': clip_dir})
  metric = metrics.create_metric('clip', context)
  images = _images(4, [(IMAGE_SIZE, IMAGE_SIZE)] * 6)
  metric.reset()
  metric.update(np.stack(images[:4]), CAPTIONS[:4])
  metric.update(np.stack(images[4:]), CAPTIONS[4:])
  expected = max(float(np.mean(scorer.scores(images, CAPTIONS))), 0.0)
  assert metric.result() == {'clip_score': pytest.approx(expected, abs=1e-6)}
  assert metric.describe()['clip_model'] == os.path.abspath(clip_dir)
  with pytest.raises(UserError, match='--clip_model'):
    metrics.create_metric('clip', metrics.EvalContext('unused', None, None, 'none'))
  with pytest.raises(UserError, match='does not exist.*CLIPModel directory'):
    metrics.create_metric('clip', metrics.EvalContext('unused', None, None, 'none',
                                                      options={'clip_model': clip_dir + '_missing'}))


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


def test_cli_scores_a_folder_and_skips_unreadable_images(tmp_path, clip_dir, scorer):
  images = _images(5, SIZES[:5])
  folder, captions = _folder(tmp_path, images, broken={2}), _captions(tmp_path, CAPTIONS[:5])
  result = subprocess.run([sys.executable, '-m', 'eval.clip_score', '--images', folder, '--captions', captions,
                           '--model', clip_dir, '--batch_size', '2', '--per_pair', str(tmp_path / 'pairs.tsv')],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [l for l in result.stdout.splitlines() if l.startswith('CLIP score: ')]
  assert len(lines) == 1, result.stdout
  kept = [0, 1, 3, 4]  # Image 2 is unreadable: it and its caption are dropped.
  per_pair = scorer.scores([images[i] for i in kept], [CAPTIONS[i] for i in kept])
  assert float(lines[0].split(': ')[1]) == pytest.approx(max(float(np.mean(per_pair)), 0.0), abs=1e-4)
  assert 'skipped 1 unreadable' in result.stderr and 'images/s' in result.stderr, result.stderr
  written = (tmp_path / 'pairs.tsv').read_text().splitlines()
  assert [l.split('\t')[0] for l in written] == [f'{i:04d}.png' for i in kept]
  assert np.allclose([float(l.split('\t')[1]) for l in written], per_pair, atol=1e-4)


def _main_error(capsys, *argv) -> str:
  with pytest.raises(SystemExit) as exit_info:
    clip_score.main(list(argv))
  assert exit_info.value.code == 2
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1
  return lines[0]


def test_cli_user_errors(tmp_path, capsys, clip_dir):
  folder, captions = _folder(tmp_path, _images(6, SIZES[:3])), _captions(tmp_path, CAPTIONS[:2])
  line = _main_error(capsys, '--images', folder, '--captions', captions, '--model', clip_dir)
  assert '3 image files' in line and '2 captions' in line
  line = _main_error(capsys, '--images', folder, '--captions', captions, '--model', str(tmp_path / 'nope'))
  assert 'does not exist' in line and 'config.json' in line and 'tokenizer' in line
  line = _main_error(capsys, '--images', folder, '--captions', captions, '--model', str(tmp_path))
  assert 'no config.json' in line


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
