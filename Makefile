# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each one sets itself up: a virtualenv in .venv, the pinned install, the csrc/ extension build.
# Re-running is cheap: the install step re-runs only when the build inputs change.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
PINS   := -c constraints.txt torch==2.13.0 triton==3.7.1
STAMP  := $(VENV)/.modelgrow-installed
EXTRAS ?= dev,text,vae,video,dali,train,eval,plot,wandb

.PHONY: install demo test test-fast test-kernels clean-ext

install: $(STAMP)

$(STAMP): Makefile pyproject.toml setup.py constraints.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23" "setuptools>=77" wheel
	$(PIP) install -q $(PINS) pybind11 ninja
	$(PIP) install -q --no-build-isolation $(PINS) -e ".[$(EXTRAS)]"
	# test data: a real Llama SentencePiece model ships inside mistral-common (its own deps are not needed)
	$(PIP) install -q --no-deps "mistral-common>=1.5"
	$(PY) -c "import modelgrow, mgkernels; print('modelgrow', modelgrow.__version__, '| csrc extension:', 'built' if mgkernels.ext_available() else mgkernels.ext_error())"
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/modelgrow demo

test: $(STAMP)
	$(PY) -m pytest -q

# tiers for developers (CI runs `make test`: all of them)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m unit

test-kernels: $(STAMP)
	$(PY) -m pytest -q -m kernels

clean-ext:
	rm -f mgkernels/_C*.so $(STAMP)
