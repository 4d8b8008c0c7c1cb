"""Property-based: any out-of-range value of a validated key gives a ConfigError naming that key, nothing else."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion.config import validate_config
from diffusion.errors import ConfigError
from support import ROOT
from support import load_config_file as load

LDM = load(os.path.join(ROOT, 'configs', 'ldm_base.py'), 'tiny')

# key -> strategy of values that must be rejected.
BAD_VALUES = {
  'optim.lr': st.floats(max_value=0.0, allow_nan=False),
  'optim.warmup_steps': st.integers(max_value=-1),
  'optim.ema_decay': st.one_of(st.floats(min_value=1.0, allow_nan=False), st.floats(max_value=-1e-9, allow_nan=False)),
  'optim.b1': st.floats(min_value=1.0, allow_nan=False),
  'optim.weight_decay': st.floats(max_value=-1e-9, allow_nan=False),
  'optim.grad_clip': st.floats(max_value=-1e-9, allow_nan=False),
  'train.num_steps': st.integers(max_value=0),
  'train.batch_size': st.integers(max_value=0),
  'train.log_every': st.integers(max_value=0),
  'train.checkpoint_every': st.integers(max_value=0),
  'train.max_bad_steps': st.integers(max_value=0),
  'train.eval_every': st.integers(max_value=-1),
  'diffusion.caption_dropout': st.one_of(
    st.floats(min_value=1.0, allow_nan=False), st.floats(max_value=-1e-9, allow_nan=False)
  ),
  'sample.num_steps': st.one_of(st.integers(max_value=0), st.integers(min_value=1001)),
  'sample.guidance_scale': st.floats(max_value=-1e-9, allow_nan=False),
  'data.image_size': st.integers(min_value=1, max_value=4096).filter(lambda n: n % 4 != 0),
  'data.max_text_length': st.integers(min_value=17, max_value=10_000),
  'mesh.fsdp': st.integers(max_value=-2),
  'wandb.mode': st.text(max_size=12).filter(lambda s: s not in ('online', 'offline', 'disabled')),
  'diffusion.prediction_type': st.text(max_size=12).filter(lambda s: s not in ('eps', 'x0', 'v', 'flow')),
}


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(sorted(BAD_VALUES)), data=st.data())
def test_bad_value_names_its_key(key, data):
  config = LDM.copy_and_resolve_references()
  value = data.draw(BAD_VALUES[key])
  section, leaf = key.split('.')
  config[section][leaf] = value
  with pytest.raises(ConfigError) as info:
    validate_config(config)
  assert info.value.key.split('.')[0] in (section, 'data', 'model'), (key, str(info.value))
  if key != 'data.image_size':  # A bad image size may be reported through the latent size it implies.
    assert info.value.key == key, (key, str(info.value))
