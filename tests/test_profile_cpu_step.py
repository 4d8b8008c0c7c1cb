"""scripts/profile_cpu_step.py: the op recording sees every op call of a U-Net forward pass, the per-op-type sums,
and (slow) a --tiny run that times both sides of every part and renders into the docs table."""

import json
import os
import re
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from diffusion import models
from support import ONE_LEVEL_UNET, ROOT, run_cli

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import make_docs  # noqa: E402
import profile_cpu_step  # noqa: E402


def _paths(params):
  return ['/'.join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def _kernels(params, rank, name_filter=lambda path: True):
  """Param paths of the kernels of `rank` dims."""
  leaves = dict(zip(_paths(params), jax.tree_util.tree_leaves(params), strict=True))
  return [p for p, leaf in leaves.items() if leaf.ndim == rank and p.endswith('kernel') and name_filter(p)]


def test_the_recorded_ops_are_every_op_call_of_one_forward_pass():
  unet = models.create_unet(ml_collections.ConfigDict({**ONE_LEVEL_UNET, 'dtype': 'float32'}))
  x, t, c = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2,), jnp.int32), jnp.zeros((2, 5, 12))
  params = jax.eval_shape(unet.init, jax.random.key(0), x, t, c)['params']
  fake = types.SimpleNamespace(ours_fn=lambda: lambda p, *a: unet.apply({'params': p}, *a), ours_params=params)
  ops = profile_cpu_step.record_op_calls(fake, (x, t, c, None))
  calls = {}
  for op in ops:
    calls[op['kind']] = calls.get(op['kind'], 0) + op['calls']
  # Each conv / Dense / norm module runs once per forward pass, so its kernels count its calls.
  conv3 = [p for p in _kernels(params, 4) if '/conv_shortcut/' not in p and '/proj_' not in p]
  assert calls['conv3x3'] == len(conv3)
  assert calls['conv1x1'] == len(_kernels(params, 4)) - len(conv3)
  attention = _kernels(params, 2, lambda p: '/attn' in p)
  assert calls['self_attention'] == len([p for p in attention if '/attn1/to_q/' in p])
  assert calls['cross_attention'] == len([p for p in attention if '/attn2/to_q/' in p])
  assert calls['dense'] == len(_kernels(params, 2)) - len(attention)  # Projections inside attention are not Dense rows.
  scales = [p for p in _paths(params) if p.endswith('/scale')]
  layer_norms = [p for p in scales if '/transformer_blocks_' in p]
  assert calls['layernorm'] == len(layer_norms)
  assert calls['groupnorm'] == len([p for p in scales if re.search(r'/attentions_\d+/norm/scale$', p)])
  assert calls['groupnorm'] + calls['groupnorm_silu'] == len(scales) - len(layer_norms)
  cross = next(op for op in ops if op['kind'] == 'cross_attention')
  assert cross['shapes'][1] == (2, 5, 12)
  assert next(op for op in ops if op['kind'] == 'conv3x3')['input_grad'] is False  # conv_in: the network input.


def test_op_sums_are_time_times_calls_and_a_conv_backward_is_both_gradients():
  rows = [
    {'kind': 'conv3x3', 'calls': 2, 'ms': {'jax:fwd': 1.0, 'jax:input_grad': 2.0, 'jax:weight_grad': 3.0,
                                           'torch:fwd': 1.0, 'torch:input_grad': 1.0, 'torch:weight_grad': 1.0}},
    {'kind': 'conv3x3', 'calls': 1, 'ms': {'jax:fwd': 4.0, 'jax:weight_grad': 1.0, 'torch:fwd': 2.0,
                                           'torch:weight_grad': 2.0}},
    {'kind': 'dense', 'calls': 3, 'ms': {'jax:fwd': 1.0, 'jax:fwd+bwd': 2.0, 'torch:fwd': 0.5, 'torch:fwd+bwd': 4.0}},
  ]  # fmt: skip
  summary = {e['op']: e for e in profile_cpu_step.summarize_ops(rows)}
  conv = summary['conv3x3']
  assert conv['calls'] == 3
  assert conv['ms']['jax:fwd'] == pytest.approx(2 * 1.0 + 4.0)
  assert conv['ms']['jax:fwd+bwd'] == pytest.approx(2 * 6.0 + 5.0)
  assert conv['ms']['torch:fwd+bwd'] == pytest.approx(2 * 3.0 + 4.0)
  assert conv['ratio_fwd+bwd'] == pytest.approx(17.0 / 10.0)
  assert summary['dense']['ratio_fwd'] == pytest.approx(2.0)
  assert [e['op'] for e in profile_cpu_step.summarize_ops(rows)] == ['conv3x3', 'dense']  # Largest JAX time first.


@pytest.mark.slow
def test_tiny_run_times_both_sides_of_every_part_and_renders(tmp_path):
  record_path = tmp_path / 'profile.json'
  out = run_cli(
    'scripts/profile_cpu_step.py', '--tiny', '--knobs', 'one_core', '--record', str(record_path), timeout=900
  )
  assert out.returncode == 0, out.stdout + out.stderr
  record = json.loads(record_path.read_text())
  res = record['results']
  assert [r['part'] for r in res['steps']] == ['step', 'fwd', 'fwd+bwd', 'adamw']
  for row in res['steps']:
    assert row['jax_ms'] > 0 and row['torch_ms'] > 0 and len(row['jax_times_s']) == record['settings']['repeats']
  assert {e['op'] for e in res['ops']} == set(profile_cpu_step.OP_LABELS)
  for entry in res['ops']:
    assert all(entry['ms'][f'{side}:{p}'] > 0 for side in ('jax', 'torch') for p in ('fwd', 'fwd+bwd'))
  assert all('jax_nchw:fwd' in r['ms'] for r in res['op_shapes'] if r['kind'] == 'conv3x3')
  assert [k['knob'] for k in res['knobs']] == ['default', 'one_core', 'torch', 'torch_1_thread']
  assert all(k['step_ms'] > 0 for k in res['knobs'])
  text = '\n'.join(make_docs.render_profile_cpu_step(record))
  assert 'GroupNorm+SiLU' in text and 'one_core' in text
