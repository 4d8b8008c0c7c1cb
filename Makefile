# Two commands for a fresh machine (Python 3.12 or 3.13, no GPU needed):  make demo  |  make test
# The first Python 3.12 / 3.13 that runs (a pyenv shim of a version that is installed but not selected does not):
# on PATH, else pyenv's installed versions. `make PYTHON=/path/to/python3.x ...` picks one.
PYTHON ?= $(firstword $(foreach p,python3.12 python3.13,$(if $(shell $(p) -c '' 2>/dev/null && echo ok),$(p))) \
  $(foreach r,$(or $(shell pyenv root 2>/dev/null),$(PYENV_ROOT),$(HOME)/.pyenv),\
    $(wildcard $(r)/versions/3.12*/bin/python3.12 $(r)/versions/3.13*/bin/python3.13)))
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEMO_DIR ?= workdirs/demo

.PHONY: demo demo-lora lint test test-slow install install-test clean

# A stamp per extra: the venv is reused while pyproject.toml is unchanged.
$(VENV)/.stamp-runtime: pyproject.toml
	test -x $(PY) || { test -n "$(PYTHON)" || { echo 'error: no Python 3.12 or 3.13 found (make PYTHON=...)' >&2; exit 2; }; $(PYTHON) -m venv $(VENV); }
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-runtime
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.stamp-runtime
install-test: $(VENV)/.stamp-test

# The quickstart: VAE, its latents of the training split cached once, then the text-to-image LDM trained from the
# cache (the same losses as encoding every step, without the encoder pass and the image decoding), a sample grid,
# caption accuracy; the last step records the run (docs/results/demo.json: numbers, wall time from DEMO_START and
# the time of each phase, commit, versions, load) and regenerates the README's demo block from it. DEMO_START is
# taken when make reads this file (install included); each phase appends "<unix time> <phase>" to phases.txt when it
# ends. A rerun resumes: finished trainings exit at once and an existing cache is kept (the LDM run refuses a cache
# made by another VAE). XLA's persistent compilation cache (DEMO_DIR/jax_cache) serves programs the later commands
# and reruns compile again.
# XLA:CPU on the jax 0.12 line spends minutes in LLVM -O3 on the networks' threefry init loops; -O2 compiles several
# times faster at the same step time (unless XLA_FLAGS already sets the level).
demo: export XLA_FLAGS := $(if $(findstring xla_backend_optimization_level,$(XLA_FLAGS)),$(XLA_FLAGS),$(XLA_FLAGS) --xla_backend_optimization_level=2)
demo: export JAX_COMPILATION_CACHE_DIR ?= $(abspath $(DEMO_DIR))/jax_cache
demo: export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0.5
demo: DEMO_START := $(shell date +%s)
demo: DEMO_LOAD := $(shell cut -d' ' -f1 /proc/loadavg 2>/dev/null)
demo: PHASE = mkdir -p $(DEMO_DIR) && echo "$$(date +%s) $(1)" >> $(DEMO_DIR)/phases.txt
demo: $(VENV)/.stamp-runtime
	mkdir -p $(DEMO_DIR) && echo "$(DEMO_START) start" > $(DEMO_DIR)/phases.txt && $(call PHASE,install)
	$(PY) train.py --config configs/vae_base.py:tiny --workdir $(DEMO_DIR)/vae
	$(call PHASE,vae)
	test -f $(DEMO_DIR)/latents/train/metadata.json || \
	  $(PY) scripts/precompute_latents.py --vae_workdir $(DEMO_DIR)/vae --out $(DEMO_DIR)/latents
	$(call PHASE,latent_cache)
	$(PY) train.py --config configs/ldm_base.py:tiny --workdir $(DEMO_DIR)/ldm --config.vae_workdir=$(DEMO_DIR)/vae \
	  --config.data.latent_cache=$(DEMO_DIR)/latents
	$(call PHASE,ldm)
	$(PY) sample.py --workdir $(DEMO_DIR)/ldm --out $(DEMO_DIR)/samples --num_images 6 \
	  --prompt "a red circle" --prompt "a green square" --prompt "a blue triangle" \
	  --prompt "a yellow square" --prompt "a magenta circle" --prompt "a cyan triangle"
	$(call PHASE,sample)
	$(PY) -m eval.caption_accuracy --workdir $(DEMO_DIR)/ldm --out $(DEMO_DIR)/caption_accuracy.json
	$(call PHASE,caption_accuracy)
	$(PY) scripts/record_demo.py --demo_dir $(DEMO_DIR) --start_time $(DEMO_START) --end_time $$(date +%s) \
	  --start_load "$(DEMO_LOAD)"

# DreamBooth with a LoRA on the demo's model (trained first when missing; finished trainings exit at once): a new shape
# and a new word ('a red cross') from 36 images of the concept's own generator, with prior preservation (the base draws
# its 18 prompts once). The last line: lora_accuracy new=.. base_new=.. old=.. base_old=.. size_ratio=.. (docs/lora.md);
# the record (docs/results/demo_lora.json) and the docs block generated from it, as make demo does.
demo-lora: export XLA_FLAGS := $(if $(findstring xla_backend_optimization_level,$(XLA_FLAGS)),$(XLA_FLAGS),$(XLA_FLAGS) --xla_backend_optimization_level=2)
demo-lora: export JAX_COMPILATION_CACHE_DIR ?= $(abspath $(DEMO_DIR))/jax_cache
demo-lora: export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0.5
demo-lora: LORA_START := $(shell date +%s)
demo-lora: LORA_LOAD := $(shell cut -d' ' -f1 /proc/loadavg 2>/dev/null)
demo-lora: $(VENV)/.stamp-runtime
	mkdir -p $(DEMO_DIR) && echo "$(LORA_START) start" > $(DEMO_DIR)/lora_phases.txt
	$(PY) train.py --config configs/vae_base.py:tiny --workdir $(DEMO_DIR)/vae
	test -f $(DEMO_DIR)/latents/train/metadata.json || \
	  $(PY) scripts/precompute_latents.py --vae_workdir $(DEMO_DIR)/vae --out $(DEMO_DIR)/latents
	$(PY) train.py --config configs/ldm_base.py:tiny --workdir $(DEMO_DIR)/ldm --config.vae_workdir=$(DEMO_DIR)/vae \
	  --config.data.latent_cache=$(DEMO_DIR)/latents
	echo "$$(date +%s) base" >> $(DEMO_DIR)/lora_phases.txt
	$(PY) scripts/make_concept_data.py --out $(DEMO_DIR)/concept --shape cross
	$(PY) train.py --config configs/ldm_base.py:dreambooth --workdir $(DEMO_DIR)/lora --config.base_workdir=$(DEMO_DIR)/ldm \
	  --config.dreambooth.instance_dir=$(DEMO_DIR)/concept --config.dreambooth.new_words="('cross',)" \
	  --config.dreambooth.class_prompts_file=$(DEMO_DIR)/concept/class_prompts.txt
	echo "$$(date +%s) lora" >> $(DEMO_DIR)/lora_phases.txt
	rm -rf $(DEMO_DIR)/lora_export
	$(PY) scripts/convert.py export-lora --workdir $(DEMO_DIR)/lora $(DEMO_DIR)/lora_export
	$(PY) -m eval.lora_accuracy --workdir $(DEMO_DIR)/lora --concept cross --num_seeds 32 \
	  --lora_file $(DEMO_DIR)/lora_export/pytorch_lora_weights.safetensors --out $(DEMO_DIR)/lora_accuracy.json
	echo "$$(date +%s) lora_accuracy" >> $(DEMO_DIR)/lora_phases.txt
	$(PY) scripts/record_demo_lora.py --demo_dir $(DEMO_DIR) --start_time $(LORA_START) --end_time $$(date +%s) \
	  --start_load "$(LORA_LOAD)"

# The same checks as .pre-commit-config.yaml: the layers contracts, ruff's lint rules and its formatting.
lint: $(VENV)/.stamp-test
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# CI runs `make test`. Every failing command fails the target, pytest's exit code 5 (no tests collected) included:
# nothing here ignores an exit code.
test: lint
	$(PY) -m pytest -q

test-slow: $(VENV)/.stamp-test
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) workdirs .pytest_cache
