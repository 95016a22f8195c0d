# Everything runs from a local virtual environment in .venv, created on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench bench-quality bench-torch clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,examples]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

demo: $(STAMP)
	$(PY) -m apollo_lm.demo

clean:
	rm -rf $(VENV) results .cache

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
	pin() { command -v taskset >/dev/null && echo "taskset -c $$1"; }; \
	$$(pin 0) $(PY) -m benchmarks.quality --configs tiny & p1=$$!; \
	$$(pin 1) $(PY) -m benchmarks.quality --configs 20m --no-ablations & p2=$$!; \
	wait $$p1 && wait $$p2
	$(PY) -m benchmarks.quality --report-only

# Our update vs the official apollo_torch on the 60M shapes; torch lives in a
# side venv only (never a project dependency).
bench-torch: $(STAMP)
	test -x .venv-torch/bin/python || $(PYTHON) -m venv .venv-torch
	.venv-torch/bin/python -m pip install --quiet torch==2.13.0 apollo-torch==1.0.3 transformers
	$(PY) -m benchmarks.update_speed --configs 60m --torch-python .venv-torch/bin/python --out-name update_speed_torch
