"""scripts/bench_lora.py: the LoRA side holds the LoRA factors only (their optimizer state and EMA a fraction of the
full side's, the base frozen), and (slow) a run of both parts on small models writes a record the docs render."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from diffusion import lora as lora_lib
from support import ONE_LEVEL_UNET, ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import bench_lora  # noqa: E402
import make_docs  # noqa: E402

# The tiny preset shrunk to one U-Net level and a one-layer text encoder (compiles fast).
SMALL = {
  'model.unet.block_out_channels': (8,),
  'model.unet.down_block_types': ('CrossAttnDownBlock2D',),
  'model.unet.up_block_types': ('CrossAttnUpBlock2D',),
  'model.unet.attention_head_dim': 2,
  'model.unet.cross_attention_dim': 8,
  'model.unet.norm_num_groups': 4,
  'model.text.hidden_size': 8,
  'model.text.intermediate_size': 16,
  'model.text.num_attention_heads': 2,
  'model.text.num_hidden_layers': 1,
}


def test_the_lora_side_trains_and_keeps_state_for_the_factors_only(tmp_path):
  args = bench_lora.parse_args(['--tiny-only', '--batch', '2', '--rank', '2'])
  tasks = bench_lora.tiny_tasks(args, str(tmp_path), SMALL)
  sizes = {}
  for side, (task, params) in tasks.items():
    state = jax.eval_shape(lambda p, task=task: bench_lora.train_state(task, p), params)
    sizes[side] = bench_lora.state_sizes(state, task.frozen)
  (lora_task, factors), (full_task, base) = tasks['lora'], tasks['full']
  lora, full = sizes['lora'], sizes['full']
  # Full fine-tuning trains the whole U-Net and text encoder (the tiny preset's text encoder is trainable).
  assert full['trained_params'] == bench_lora.tree_size(base) == sum(np.size(x) for x in jax.tree.leaves(base))
  # The LoRA side trains A and B of every default target and nothing else; the base is frozen.
  modules = lora_lib.modules(factors)
  assert set(modules) == set(lora_lib.target_kernels(base, lora_lib.DEFAULT_TARGETS))
  assert all(m['a'].shape[0] == 2 for m in modules.values())
  assert lora['trained_params'] == lora_lib.count_params(factors) < full['trained_params'] / 5
  # Adam's two moments (and the EMA) scale with the trained params.
  assert lora['opt_state_bytes'] < full['opt_state_bytes'] / 5
  assert 2 * lora['params_bytes'] <= lora['opt_state_bytes'] < 2 * lora['params_bytes'] + 64
  assert lora['ema_bytes'] == lora['params_bytes']
  assert lora['frozen_bytes'] >= full['params_bytes'] + full['frozen_bytes']  # The base beside the VAE.
  assert set(lora_task.frozen) == {'vae', 'base'} and set(full_task.frozen) == {'vae'}


@pytest.mark.slow
def test_a_run_of_both_parts_writes_a_record_the_docs_render(tmp_path):
  path = str(tmp_path / 'bench_lora.json')
  argv = ['--repeats', '1', '--warmup', '0', '--batch', '2', '--inputs', 'latents', '--record', path]
  assert bench_lora.main(argv, tiny_overrides=SMALL, sd15_overrides=ONE_LEVEL_UNET) == path
  with open(path) as f:
    record = json.load(f)
  tiny, sd = record['results']['tiny'], record['results']['sd15']
  for part in (tiny, sd):
    lora, full = part['sides']['lora'], part['sides']['full']
    assert lora['opt_state_bytes'] < full['opt_state_bytes']
    assert lora['compiled_memory']['total_bytes'] < full['compiled_memory']['total_bytes']
    ratio = part['ratio_lora_over_full']
    assert ratio['opt_state_bytes'] == pytest.approx(lora['opt_state_bytes'] / full['opt_state_bytes'])
  assert len(tiny['sides']['lora']['times_s']) == len(tiny['sides']['full']['times_s']) == 1
  assert (
    tiny['ratio_lora_over_full']['median_s'] == tiny['sides']['lora']['median_s'] / tiny['sides']['full']['median_s']
  )
  # The SD part's full step holds the params, two Adam moments and the EMA as arguments (donated to the outputs).
  full = sd['sides']['full']
  assert (
    full['compiled_memory']['arguments_bytes'] >= full['params_bytes'] + full['opt_state_bytes'] + full['ema_bytes']
  )
  text = '\n'.join(make_docs.render_bench_lora(record))
  assert f'**{tiny["ratio_lora_over_full"]["median_s"]:.2f}**' in text and 'Compiled memory' in text
