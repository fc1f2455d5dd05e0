# The two set-up commands of the README: `make bench` and `make test`.
# Each creates .venv when missing and installs what it needs, torch first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peft_fast_installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: test bench install clean peft-suite

$(PY):
	$(PYTHON) -m venv $(VENV)

# The optional C++/CUDA extension peft_fast._C: editing its sources reinstalls (rebuilds it).
CSRC := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)

# torch goes in first and alone; an existing torch (e.g. a user's CUDA build) is kept.
$(STAMP): $(PY) requirements-dev.txt requirements-gpu-image.txt pyproject.toml setup.py $(CSRC)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/triton-gpu-image -r requirements-gpu-image.txt
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q --timeout=900 -m "not interp" tests
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -q --timeout=900 -m interp tests

# PEFT's own tests/test_custom_models.py (LoRA and IA3 cases), unchanged, against peft_fast;
# PEFT_IMPL=peft runs the same selection against real peft (the ceiling). See the runner's header.
peft-suite: $(STAMP)
	../shared/peft_suite/run.sh $(PY) tests/test_custom_models.py LoraConfig,IA3Config -n 2

bench: $(STAMP)
	$(VENV)/bin/peft-fast bench --out bench_out

clean:
	rm -rf $(VENV) build *.egg-info peft_fast/_C.*.so peft_fast/_C_BUILD_FAILED
