# d2nwg: `make demo` runs the main job, `make test` runs the tests. Both set everything up.
VENV      ?= .venv
PY        := $(VENV)/bin/python
TORCH     ?= torch==2.14.1
# Build the CUDA ops too when torch is a CUDA build and a toolkit is present (setup.py checks).
FORCE_CUDA ?= 1
PYTEST_ARGS ?=

.PHONY: demo test lint build bench gpu-suite wheel clean

# transformers and peft (the hf extra) too: the LoRA demo (d2nwg demo --lora) needs them, and
# tests/test_hf.py, tests/test_lora_demo.py and the coexistence checks of tests/test_package.py
# run with them rather than skipping; diffusers: the few-step samplers'
# oracle (tests/test_few_step_samplers.py).
$(VENV)/.deps: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" triton numpy safetensors einops tqdm ninja \
		setuptools wheel pytest pytest-benchmark scikit-learn matplotlib hypothesis ruff \
		transformers peft diffusers
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*)
	FORCE_CUDA=$(FORCE_CUDA) $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

build: $(VENV)/.built

demo: build
	$(PY) -m d2nwg demo

test: build
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# ruff (rules in pyproject.toml): lint, and the formatting check.
lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: build
	$(PY) -m pytest -q bench --benchmark-columns=median,iqr,ops

gpu-suite: build
	$(PY) bench/gpu_suite.py

# Wheels for chosen GPU targets, e.g. `make wheel TORCH_CUDA_ARCH_LIST="8.0;9.0"`.
wheel: $(VENV)/.deps
	TORCH_CUDA_ARCH_LIST="$(or $(TORCH_CUDA_ARCH_LIST),8.0;9.0)" $(PY) -m pip wheel \
		--no-deps --no-build-isolation -w dist .

clean:
	rm -rf build dist *.egg-info d2nwg/_C*.so $(VENV)/.built
