"""DreamBooth (configs/ldm_base.py:dreambooth) as a LoRA on the frozen tiny LDM of the session fixture: a new word in
a spare slot, the prior's images drawn once by the base, per-example loss weights, errors before anything trains."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import workdir as workdir_lib
from diffusion.data import shapes
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.errors import ConfigError, UserError
from diffusion.images import save_png
from diffusion.pipeline import LatentDiffusionPipeline
from diffusion.training import train_and_evaluate
from diffusion.training.ldm_task import LDMTask
from support import LDM, load_config

NUM_CLASS = 3


def instance_folder(path: str, num: int = 2) -> str:
  os.makedirs(path, exist_ok=True)
  rows = []
  for i in range(num):
    scene = shapes.concept_scene_for_index('cross', 0, i)
    save_png(shapes.render_scene(scene, 32), os.path.join(path, f'{i}.png'))
    rows.append({'file_name': f'{i}.png', 'text': scene.caption})
  with open(os.path.join(path, 'metadata.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return path


def dreambooth_config(data_dir: str, base: str, instances: str, **more):
  overrides = {
    'train.eval_every': 0,
    'train.sample_every': 0,
    'train.num_steps': 2,
    'train.batch_size': 4,
    'lora.rank': 2,
    'lora.alpha': 2.0,
    'lora.text_encoder': True,
    'dreambooth.instance_dir': instances,
    'dreambooth.new_words': ('cross',),
    'dreambooth.class_prompts': ('a red circle', 'a blue square'),
    'dreambooth.num_class_images': NUM_CLASS,
    'dreambooth.prior_loss_weight': 0.5,
    **more,
  }
  return load_config('ldm_base', LDM, data_dir, base_workdir=base, **overrides)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir, ldm_workdir) -> str:
  workdir = str(tmp_path_factory.mktemp('dreambooth'))
  instances = instance_folder(str(tmp_path_factory.mktemp('instances')))
  train_and_evaluate(dreambooth_config(data_dir, ldm_workdir, instances), workdir)
  return workdir


def test_new_word_gets_a_spare_slot_and_sampling_knows_it(trained, ldm_workdir):
  base_tokenizer = workdir_lib.load_tokenizer(ldm_workdir)
  tokenizer = workdir_lib.load_tokenizer(trained)
  assert len(tokenizer) == len(base_tokenizer)  # The text encoder's table keeps its size.
  base_vocab, vocab = tokenizer_lib.word_vocabulary(base_tokenizer), tokenizer_lib.word_vocabulary(tokenizer)
  assert vocab['cross'] == base_vocab['<spare_0>'] and '<spare_0>' not in vocab
  assert all(vocab[w] == i for w, i in base_vocab.items() if not w.startswith('<spare_'))
  pipeline = LatentDiffusionPipeline.from_workdir(trained)
  assert pipeline.tokenize(['a red cross'])[0][3] == vocab['cross']
  base = LatentDiffusionPipeline.from_workdir(ldm_workdir)
  with pytest.raises(UserError, match=r"unknown word\(s\) \['cross'\]"):
    base.tokenize(['a red cross'])  # Never a silent <unk>.


def test_prior_images_drawn_once_and_weighted(trained):
  rows = [json.loads(line) for line in open(os.path.join(trained, 'dreambooth', 'metadata.jsonl'))]
  prior = [r for r in rows if r['loss_weight'] == 0.5]
  assert [r['text'] for r in prior] == ['a red circle', 'a blue square', 'a red circle']
  assert all(os.path.isfile(r['file_name']) for r in rows)
  instances = [r for r in rows if r['loss_weight'] == 1.0]
  config = workdir_lib.load_workdir_config(trained)
  written = {json.loads(line)['text'] for line in open(os.path.join(config.dreambooth.instance_dir, 'metadata.jsonl'))}
  assert len(instances) == 2 * round(NUM_CLASS / 2) and {r['text'] for r in instances} == written
  stamp = os.path.getmtime(prior[0]['file_name'])
  assert config.data.name == 'folder' and config.data.folder.path == os.path.join(trained, 'dreambooth')
  train_and_evaluate(
    dreambooth_config(config.data.data_dir, config.base_workdir, config.dreambooth.instance_dir), trained
  )
  assert os.path.getmtime(prior[0]['file_name']) == stamp  # A finished (or resumed) run draws nothing again.


def test_loss_weights_scale_each_example(data_dir, ldm_workdir, tmp_path):
  task = LDMTask(load_config('ldm_base', LDM, data_dir, init_from=ldm_workdir), str(tmp_path))
  params = workdir_lib.load_trained_params(ldm_workdir)[0]
  batch = {'image': jnp.zeros((2, 32, 32, 3)), 'input_ids': jnp.ones((2, task.config.data.max_text_length), jnp.int32)}
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  loss_fn = jax.jit(task.loss_fn)  # One compile: every batch below has the same structure.
  loss = lambda w: float(loss_fn(params, task.frozen, {**batch, 'loss_weight': w}, keys, jnp.zeros((), jnp.int32))[0])
  w = np.asarray([1.0, 0.0], np.float32)
  plain, first, second = loss(np.ones(2, np.float32)), loss(w), loss(1.0 - w)
  np.testing.assert_allclose(first + second, plain, rtol=1e-5)  # mean(w l) + mean((1 - w) l) = mean(l).
  assert first > 0 and second > 0 and abs(first - second) > 1e-6


@pytest.mark.parametrize(
  'more, message',
  [
    ({'dreambooth.new_words': ()}, r"unknown word\(s\) \['cross'\]"),
    ({'dreambooth.class_prompts': ('a red star',)}, r"unknown word\(s\) \['star'\]"),
    ({'dreambooth.new_words': tuple(f'w{i}' for i in range(9))}, 'spare slot'),
  ],
)
def test_bad_words_fail_before_training(data_dir, ldm_workdir, tmp_path, more, message):
  instances = instance_folder(str(tmp_path / 'instances'), num=1)
  config = dreambooth_config(data_dir, ldm_workdir, instances, **{'dreambooth.num_class_images': 2, **more})
  with pytest.raises(UserError, match=message):
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.listdir(tmp_path / 'run' / 'checkpoints') if os.path.isdir(tmp_path / 'run' / 'checkpoints') else True
  assert not os.path.exists(tmp_path / 'run' / 'dreambooth' / 'class')  # The words are checked before any drawing.


def test_config_errors(data_dir, ldm_workdir, tmp_path):
  from diffusion.config import validate_config

  instances = instance_folder(str(tmp_path / 'instances'), num=1)
  config = dreambooth_config(data_dir, '', instances, **{'lora.rank': 0})
  with pytest.raises(ConfigError, match='dreambooth.instance_dir'):
    validate_config(config)  # Neither base_workdir nor init_from.
  with pytest.raises(ConfigError, match='dreambooth.instance_dir'):
    validate_config(dreambooth_config(data_dir, ldm_workdir, str(tmp_path / 'missing')))
  with pytest.raises(ConfigError, match='dreambooth.num_class_images'):
    validate_config(dreambooth_config(data_dir, ldm_workdir, instances, **{'dreambooth.num_class_images': 1}))


@pytest.mark.slow
def test_full_fine_tuning_dreambooth_takes_the_base_over(tmp_path, data_dir, ldm_workdir):
  """lora.rank = 0 with init_from: the run starts from the base's params and VAE, knows the new word, trains."""
  instances = instance_folder(str(tmp_path / 'instances'))
  config = dreambooth_config(data_dir, '', instances, **{'lora.rank': 0, 'dreambooth.num_class_images': 2})
  config.init_from = ldm_workdir
  workdir = str(tmp_path / 'run')
  train_and_evaluate(config, workdir)
  assert 'cross' in tokenizer_lib.word_vocabulary(workdir_lib.load_tokenizer(workdir))
  assert 'vae_workdir' not in workdir_lib.load_built_on(workdir) and 'init_from' in workdir_lib.load_built_on(workdir)
  vae = workdir_lib.load_frozen(workdir, 'vae')
  base_vae = workdir_lib.load_frozen(ldm_workdir, 'vae')
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(vae), jax.tree.leaves(base_vae)))
  params = workdir_lib.load_trained_params(workdir)[0]
  base = workdir_lib.load_trained_params(ldm_workdir)[0]
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params['unet']), jax.tree.leaves(base['unet']))]
  assert any(moved)
  assert LatentDiffusionPipeline.from_workdir(workdir).tokenize(['a red cross']).shape[0] == 1
