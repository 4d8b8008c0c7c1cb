"""LoRA files <-> diffusers + peft: a random LoRA on a random tiny SD pipeline, merged by us (scripts/convert.py import
--lora FILE:SCALE, then export) and by diffusers (load_lora_weights + fuse_lora), gives the same weights; kohya files
and our export-lora output too; bad LoRA input is one error line and writes nothing."""

import os
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffusion import interop
from diffusion import lora as lora_lib
from diffusion.interop import naming
from support import run_convert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNET_TARGETS = ['to_q', 'to_k', 'to_v', 'to_out.0']
TEXT_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'out_proj']
WEIGHTS = 'pytorch_lora_weights.safetensors'
TOLERANCE = 1e-5


convert = run_convert


def _one_error_line(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 2, (result.stdout, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  return lines[0]


def _pipeline(ref, directory: str):
  return ref.diffusers.StableDiffusionPipeline.from_pretrained(directory, safety_checker=None)


@pytest.fixture(scope='module')
def lora_dir(sd_pipeline_dir, tmp_path_factory, ref) -> str:
  """A random LoRA (B nonzero, alpha != r) on the U-Net (r 4, alpha 6) and text encoder (r 2, alpha 5), saved by
  diffusers' save_lora_weights with the peft configs as adapter metadata."""
  peft = pytest.importorskip('peft')
  from peft.utils import get_peft_model_state_dict

  ref.torch.manual_seed(1)
  pipe = _pipeline(ref, sd_pipeline_dir)
  unet_config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS, init_lora_weights=False)
  text_config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=TEXT_TARGETS, init_lora_weights=False)
  pipe.unet.add_adapter(unet_config)
  peft.inject_adapter_in_model(text_config, pipe.text_encoder)
  directory = str(tmp_path_factory.mktemp('lora'))
  ref.diffusers.StableDiffusionPipeline.save_lora_weights(
    directory,
    unet_lora_layers=get_peft_model_state_dict(pipe.unet),
    text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
    unet_lora_adapter_metadata=unet_config.to_dict(),
    text_encoder_lora_adapter_metadata=text_config.to_dict(),
  )
  return directory


def _fused(ref, pipeline_dir: str, lora_dir: str, scale: float, weight_name: str = WEIGHTS):
  """diffusers' merged U-Net and text-encoder state dicts (text names without the `text_model.` prefix)."""
  pipe = _pipeline(ref, pipeline_dir)
  pipe.load_lora_weights(lora_dir, weight_name=weight_name)
  pipe.fuse_lora(lora_scale=scale)
  pipe.unload_lora_weights()
  unet = {k: v.detach().numpy() for k, v in pipe.unet.state_dict().items()}
  text = {k.removeprefix('text_model.'): v.detach().numpy() for k, v in pipe.text_encoder.state_dict().items()}
  return unet, text


def _exported(directory: str):
  unet = load_file(os.path.join(directory, 'unet', 'diffusion_pytorch_model.safetensors'))
  text = load_file(os.path.join(directory, 'text_encoder', 'model.safetensors'))
  return unet, {k.removeprefix('text_model.'): v for k, v in text.items()}


def _assert_same(got: dict, want: dict, what: str) -> float:
  """Every tensor of `got` equals `want`'s to TOLERANCE; returns the largest difference."""
  assert set(got) <= set(want), sorted(set(got) - set(want))[:5]
  worst = 0.0
  for name, value in got.items():
    difference = float(np.max(np.abs(value - want[name]))) if value.size else 0.0
    assert difference <= TOLERANCE, f'{what}/{name}: {difference}'
    worst = max(worst, difference)
  print(f'{what}: max abs difference {worst:.2e} over {len(got)} tensors')  # Shown with pytest -s.
  return worst


@pytest.fixture(scope='module')
def merged_export(sd_pipeline_dir, lora_dir, tmp_path_factory) -> tuple[str, str]:
  """(workdir imported with --lora FILE:0.7, its export)."""
  workdir, out = str(tmp_path_factory.mktemp('w_lora')), str(tmp_path_factory.mktemp('x') / 'exported')
  result = convert('import', sd_pipeline_dir, '--workdir', workdir, '--lora', f'{os.path.join(lora_dir, WEIGHTS)}:0.7')
  assert result.returncode == 0, result.stderr
  assert '1 LoRA(s) merged' in result.stdout
  result = convert('export', '--workdir', workdir, out)
  assert result.returncode == 0, result.stderr
  return workdir, out


def test_load_lora_reads_the_diffusers_file(lora_dir):
  loras = interop.load_lora(lora_dir)
  modules = lora_lib.modules(loras)
  unet = [p for p in modules if p[0] == 'unet']
  text = [p for p in modules if p[0] == 'text']
  # 4 transformer blocks (down 0, mid, 2 in up 1) x 2 attentions x 4 projections; 2 CLIP layers x 4 projections.
  assert len(unet) == 32 and len(text) == 8
  to_q = modules[('unet', 'mid_block', 'attentions_0', 'transformer_blocks_0', 'attn2', 'to_k')]
  assert to_q['a'].shape == (4, 32) and to_q['b'].shape == (32, 4) and float(to_q['alpha']) == 6.0
  q_proj = modules[('text', 'encoder', 'layers_1', 'self_attn', 'q_proj')]
  assert q_proj['a'].shape == (2, 32) and float(q_proj['alpha']) == 5.0


def test_import_with_lora_equals_diffusers_fuse(merged_export, sd_pipeline_dir, lora_dir, ref):
  unet, text = _fused(ref, sd_pipeline_dir, lora_dir, 0.7)
  got_unet, got_text = _exported(merged_export[1])
  base_unet = load_file(os.path.join(sd_pipeline_dir, 'unet', 'diffusion_pytorch_model.safetensors'))
  changed = [k for k in got_unet if not np.array_equal(got_unet[k], base_unet[k])]
  assert len(changed) == 32  # The LoRA moved every targeted kernel and nothing else.
  base_text = {
    k.removeprefix('text_model.'): v
    for k, v in load_file(os.path.join(sd_pipeline_dir, 'text_encoder', 'model.safetensors')).items()
  }
  assert sum(not np.array_equal(got_text[k], base_text[k]) for k in got_text) == 8
  _assert_same(got_unet, unet, 'unet')
  _assert_same(got_text, text, 'text_encoder')


def test_export_lora_loads_in_diffusers(merged_export, sd_pipeline_dir, tmp_path, ref):
  out = str(tmp_path / 'lora_out')
  result = convert('export-lora', '--workdir', merged_export[0], out)
  assert result.returncode == 0, result.stderr
  assert os.path.isfile(os.path.join(out, WEIGHTS))
  unet, text = _fused(ref, sd_pipeline_dir, out, 1.0)
  got_unet, got_text = _exported(merged_export[1])
  _assert_same(got_unet, unet, 'unet')
  _assert_same(got_text, text, 'text_encoder')


def _kohya_file(path: str, rng: np.random.Generator) -> None:
  """A kohya LoRA (lora_unet_* / lora_te_*, lora_down / lora_up / alpha) on some U-Net attention projections, one
  res-block conv (LoCon) and the first CLIP layer's projections; ranks differ per module, alpha (3) is not a rank.
  (One alpha for all: diffusers 0.39 drops per-module kohya alphas of some U-Net modules.)"""
  state = {}
  modules = [
    ('lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q', (16, 16)),  # (in, out)
    ('lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0', (16, 16)),
    ('lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k', (32, 32)),
  ] + [(f'lora_te_text_model_encoder_layers_0_self_attn_{p}', (32, 32)) for p in TEXT_TARGETS]
  for i, (name, (fan_in, out)) in enumerate(modules):
    rank = 2 + i % 2
    state[f'{name}.lora_down.weight'] = rng.standard_normal((rank, fan_in), np.float32)
    state[f'{name}.lora_up.weight'] = rng.standard_normal((out, rank), np.float32)
    state[f'{name}.alpha'] = np.asarray(3.0, np.float32)
  conv = 'lora_unet_down_blocks_0_resnets_0_conv1'
  state[f'{conv}.lora_down.weight'] = rng.standard_normal((2, 16, 3, 3), np.float32)
  state[f'{conv}.lora_up.weight'] = rng.standard_normal((16, 2, 1, 1), np.float32)
  state[f'{conv}.alpha'] = np.asarray(3.0, np.float32)
  save_file(state, path)


def test_kohya_file_equals_diffusers(sd_pipeline_dir, tmp_path, ref):
  path = str(tmp_path / 'kohya.safetensors')
  _kohya_file(path, np.random.default_rng(0))
  _, unet_params = interop.load_unet(sd_pipeline_dir)
  _, text_params = interop.load_text_encoder(sd_pipeline_dir)
  merged = lora_lib.merge({'unet': unet_params, 'text': text_params}, [interop.load_lora(path)], [0.7])
  got_unet = naming.flax_to_torch(merged['unet'], naming.UNET)
  got_text = {
    k.removeprefix('text_model.'): v for k, v in naming.flax_to_torch(merged['text'], naming.CLIP_TEXT).items()
  }
  # diffusers 0.39 with transformers 5 cannot load kohya text-encoder keys (it looks for `text_model.` modules that
  # transformers 5 no longer has): it merges the U-Net part, and the text part is checked against the closed form.
  state = load_file(path)
  save_file({k: v for k, v in state.items() if k.startswith('lora_unet_')}, str(tmp_path / 'unet_only.safetensors'))
  unet, _ = _fused(ref, sd_pipeline_dir, str(tmp_path), 0.7, weight_name='unet_only.safetensors')
  base = load_file(os.path.join(sd_pipeline_dir, 'unet', 'diffusion_pytorch_model.safetensors'))
  assert sum(not np.array_equal(got_unet[k], base[k]) for k in got_unet) == 4  # 3 projections and the conv.
  _assert_same(got_unet, unet, 'unet')
  text = {
    k.removeprefix('text_model.'): v
    for k, v in load_file(os.path.join(sd_pipeline_dir, 'text_encoder', 'model.safetensors')).items()
  }
  for projection in TEXT_TARGETS:
    name = f'lora_te_text_model_encoder_layers_0_self_attn_{projection}'
    down, up = state[f'{name}.lora_down.weight'], state[f'{name}.lora_up.weight']
    key = f'encoder.layers.0.self_attn.{projection}.weight'
    text[key] = text[key] + 0.7 * 3.0 / down.shape[0] * up @ down
  _assert_same(got_text, text, 'text_encoder')


def test_bad_lora_files_are_one_error_line(sd_pipeline_dir, lora_dir, tmp_path):
  rng = np.random.default_rng(0)
  nowhere = str(tmp_path / 'nowhere.safetensors')
  save_file(
    {
      'unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight': rng.random((2, 16), np.float32),
      'unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight': rng.random((16, 2), np.float32),
    },
    nowhere,
  )
  not_lora = str(tmp_path / 'weights.safetensors')
  save_file({'conv_in.weight': rng.random((4, 4), np.float32)}, not_lora)
  other_base = str(tmp_path / 'other.safetensors')
  name = 'unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q'
  save_file(
    {
      f'{name}.lora_A.weight': rng.random((2, 64), np.float32),
      f'{name}.lora_B.weight': rng.random((64, 2), np.float32),
    },
    other_base,
  )
  cases = [
    (nowhere, 'match no kernel of the model: unet/down_blocks_7/attentions_0/transformer_blocks_0/attn1/to_q'),
    (not_lora, 'are not LoRA factors of a U-Net or text encoder module (diffusers unet.* / text_encoder.* or kohya'),
    (other_base, 'a LoRA of another base?): unet/mid_block/attentions_0/transformer_blocks_0/attn1/to_q (kernel'),
    (f'{os.path.join(lora_dir, WEIGHTS)}:strong', "the scale 'strong' is not a number"),
  ]
  for i, (value, message) in enumerate(cases):
    workdir = tmp_path / f'w{i}'
    line = _one_error_line(convert('import', sd_pipeline_dir, '--workdir', str(workdir), '--lora', value))
    assert message in line, line
    assert not workdir.exists() or not os.listdir(workdir), 'an error must write nothing'
  (tmp_path / 'plain').mkdir()  # Not a workdir at all: refused before anything is read or written.
  line = _one_error_line(convert('export-lora', '--workdir', str(tmp_path / 'plain'), str(tmp_path / 'o')))
  assert 'is not a training workdir (no config.json)' in line and not (tmp_path / 'o').exists()


@pytest.mark.slow  # A sample.py worker process (the JAX import); the scale parsing itself is tested in test_lora.py.
def test_sample_lora_flag_errors(merged_export, lora_dir, tmp_path):
  from cli_worker import CliWorker, assert_user_error

  worker = CliWorker('sample.py')
  try:
    base = ['--workdir', merged_export[0], '--prompt', 'a red circle', '--out', str(tmp_path / 'o')]
    lora = os.path.join(lora_dir, WEIGHTS)
    assert_user_error(worker.run(*base, '--lora', f'{lora}:x0.5'), "the scale 'x0.5' is not a number")
    assert_user_error(worker.run(*base, '--lora', str(tmp_path / 'missing.safetensors')), 'does not exist')
    other = str(tmp_path / 'other.safetensors')
    name = 'unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q'
    rng = np.random.default_rng(0)
    save_file(
      {
        f'{name}.lora_A.weight': rng.random((2, 64), np.float32),
        f'{name}.lora_B.weight': rng.random((64, 2), np.float32),
      },
      other,
    )
    assert_user_error(worker.run(*base, '--lora', other), f'--lora {other}: LoRA does not fit the model')
  finally:
    worker.close()
  assert not (tmp_path / 'o').exists()


@pytest.mark.slow  # Two tiny-SD sampling compiles.
def test_sampling_with_lora_equals_the_merged_import(merged_export, sd_pipeline_dir, lora_dir, tmp_path):
  """`--lora FILE:0.7` on the plain imported workdir samples what the workdir imported with that LoRA samples."""
  from diffusion.generation import sample_to_directory

  plain = str(tmp_path / 'plain')
  assert convert('import', sd_pipeline_dir, '--workdir', plain).returncode == 0
  kwargs = dict(num_images=2, num_steps=3, guidance_scale=2.0)
  a = sample_to_directory(merged_export[0], ['a red circle'], str(tmp_path / 'a'), **kwargs)
  b = sample_to_directory(
    plain, ['a red circle'], str(tmp_path / 'b'), loras=[(os.path.join(lora_dir, WEIGHTS), 0.7)], **kwargs
  )
  sample_to_directory(plain, ['a red circle'], str(tmp_path / 'c'), **kwargs)
  assert b['loras'] == [{'path': os.path.join(lora_dir, WEIGHTS), 'scale': 0.7}] and 'loras' not in a
  from PIL import Image

  image = lambda d, i: np.asarray(Image.open(tmp_path / d / f'{i:04d}.png'), np.int16)
  for i in range(2):
    assert np.abs(image('a', i) - image('b', i)).max() <= 1  # The same merged weights (float rounding aside).
    assert np.abs(image('a', i) - image('c', i)).max() > 8  # And the LoRA changes the images.
