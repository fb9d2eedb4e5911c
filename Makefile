# llava-min: set-up, tests, demo and benchmarks. Every target creates .venv first if it is missing.
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
# On a CPU-only machine, install the CPU build of torch (a plain `pip install torch` pulls a multi-GB CUDA
# build). Override for GPUs: make TORCH_SPEC='torch' ...
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup test test-all demo pairs bench clean

$(VENV)/.ready: requirements.txt requirements-test.txt
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip >/dev/null || true
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)" || $(PYTHON) -m pip install -q "$(TORCH_SPEC)" --index-url $(TORCH_INDEX)
	$(PYTHON) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

setup: $(VENV)/.ready

# Three pytest workers on two cores: the SIGSTOP and timeout tests mostly wait (tests/conftest.py starts them
# first), so the CPU-bound tests run beside them.
test: setup
	$(PYTHON) -m pytest -q -n 3 --dist load tests

demo: setup
	bash data/demo.sh $(PYTHON)

pairs: setup
	bash data/pairs.sh $(PYTHON)

bench: setup
	for f in bench/train_step.py bench/generate.py bench/memory.py bench/loader.py; do $(PYTHON) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
