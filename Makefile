# Two commands do all set-up: `make demo` and `make test`. Both install the exact tested versions of every
# dependency from requirements/lock.txt (pip constraints) into .venv, then run.
#
# TORCH_SPEC picks the torch build. The default is the CPU build used on CI machines (where a local wheel or
# TORCH_INDEX provides it); GPU users: `make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128`, or install a
# CUDA torch into .venv first (see docs/install-and-lock.md). Everything else stays on the lock either way.
#
# make lock          re-resolve the newest releases within pyproject.toml's ranges and rewrite the lock
# make test-latest   the suite against the newest releases, in a scratch venv (not CI's path); prints what moved
# make test-torchvision  the model tests with torchvision (smp, deeplabv3) beside a CUDA torch, and the nnU-Net parity tests
#                        against real nnunetv2; CI runs it after make test
# make test-litert   the LiteRT (tflite) export tests in their own venv (litert-torch brings jax and more); CI runs it
PYTHON ?= python3
VENV ?= .venv
LOCK ?= requirements/lock.txt
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
LATEST_VENV ?= .venv-latest
LATEST_TORCH_SPEC ?= torch
PYTEST_ARGS ?=
# medseg[networks] without torchvision, whose PyPI build does not load beside the CPU torch: transformers (segformer),
# and nnU-Net's dynamic-network-architectures without its timm -> torchvision dependency (resenc_unet never imports
# timm). smp and deeplabv3 need torchvision: `make test-torchvision` tests them beside a CUDA build of torch.
CPU_NETWORKS := transformers
NO_DEPS := dynamic-network-architectures
TV_VENV ?= .venv-torchvision
TV_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# real nnU-Net for the parity tests (tests/models/test_nnunet_parity.py): never a medseg dependency; it needs
# torchvision (through timm), so it lives beside it, after the lock check (its own dependencies are not in the lock)
NNUNET_SPEC ?= nnunetv2==2.8.1
LITERT_VENV ?= .venv-litert
LITERT_LOCK ?= requirements/litert.txt
BIN := $(VENV)/bin
TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple,)
PIP = $(1)/bin/python -m pip install -q

.PHONY: demo test test-quick lint install lock test-latest test-torchvision test-litert clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip, setuptools and wheel first (the lock's pip knows --build-constraint), then torch, then medseg; the build
# environments of medseg and of any sdist get the locked setuptools too. The check fails when the environment
# holds a package the lock does not (a dependency added without `make lock`).
$(VENV)/.installed: $(BIN)/python pyproject.toml $(LOCK)
	$(call PIP,$(VENV)) -c $(LOCK) pip setuptools wheel
	$(call PIP,$(VENV)) -c $(LOCK) $(TORCH_FLAGS) "$(TORCH_SPEC)"
	$(call PIP,$(VENV)) -c $(LOCK) --build-constraint $(LOCK) -e ".[test]" $(CPU_NETWORKS)
	$(call PIP,$(VENV)) -c $(LOCK) --no-deps $(NO_DEPS)
	$(BIN)/python tools/lock.py check $(LOCK)
	touch $@

# The reports' volume viewer (NiiVue) from npm, at the version package-lock.json pins (with its integrity hash);
# without npm the reports show their static figures (say so, do not fail: `pip install medseg` users have no npm).
NIIVUE := node_modules/@niivue/niivue/dist/niivue.umd.js
$(NIIVUE): package.json package-lock.json
	@if command -v npm >/dev/null; then npm ci --ignore-scripts --no-audit --no-fund --omit=dev --loglevel=error && touch $@; \
	else echo "npm not found: reports get no interactive viewer (apt-get install npm, then make install)"; fi

install: $(VENV)/.installed $(NIIVUE)

demo: install
	$(BIN)/medseg demo -o demo_output

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit tier (under 2 minutes on 2 cores): no training, no subprocess CLI runs, no servers or browser.
QUICK_TESTS := tests/test_config.py tests/test_errors.py tests/test_losses.py tests/test_layers.py tests/test_doctests.py \
	tests/test_docs.py tests/inference/test_options.py tests/test_presets.py tests/metrics tests/transforms tests/io/test_nifti.py tests/io/test_case_ids.py tests/io/test_dataset.py
test-quick: install
	$(BIN)/python -m pytest -q $(QUICK_TESTS) -m "not slow and not gpu and not browser" $(PYTEST_ARGS)

# ruff (pyflakes, import order, bugbear, blind excepts, stale noqa) and mypy; CI runs it before the tests.
lint: install
	$(BIN)/ruff check medseg tests benchmarks pipelines tools
	$(BIN)/mypy medseg

# A scratch venv with the newest releases pyproject.toml allows (what `pip install medseg` gives a user today).
$(LATEST_VENV)/.installed: pyproject.toml
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(call PIP,$(LATEST_VENV)) --upgrade pip setuptools wheel
	$(call PIP,$(LATEST_VENV)) $(TORCH_FLAGS) "$(LATEST_TORCH_SPEC)"
	$(call PIP,$(LATEST_VENV)) --upgrade --upgrade-strategy eager -e ".[test,networks]" "$(LATEST_TORCH_SPEC)"
	touch $@

# The networks that need torchvision (smp, deeplabv3), and every model test beside them, with a CUDA build of torch
# and its torchvision (what a GPU user installs; both lie on the CI machines' disk) and the lock for the rest.
$(TV_VENV)/.installed: pyproject.toml $(LOCK)
	rm -rf $(TV_VENV)
	$(PYTHON) -m venv $(TV_VENV)
	$(call PIP,$(TV_VENV)) -c $(LOCK) pip setuptools wheel
	$(call PIP,$(TV_VENV)) -c $(LOCK) $(TV_TORCH_SPEC)
	$(call PIP,$(TV_VENV)) -c $(LOCK) --build-constraint $(LOCK) -e ".[test,networks]"
	$(TV_VENV)/bin/python tools/lock.py check $(LOCK)
	$(call PIP,$(TV_VENV)) -c $(LOCK) "$(NNUNET_SPEC)"
	touch $@

test-torchvision: $(TV_VENV)/.installed
	MEDSEG_REQUIRE_ALL_NETWORKS=1 $(TV_VENV)/bin/python -m pytest tests/models $(PYTEST_ARGS)

# medseg[litert] (litert-torch, ai-edge-litert, at the versions of requirements/litert.txt) beside the locked torch
# and medseg: its converter pulls jax, torchao and the LiteRT converter, which the main lock keeps out.
$(LITERT_VENV)/.installed: pyproject.toml $(LOCK) $(LITERT_LOCK)
	rm -rf $(LITERT_VENV)
	$(PYTHON) -m venv $(LITERT_VENV)
	$(call PIP,$(LITERT_VENV)) -c $(LOCK) pip setuptools wheel
	$(call PIP,$(LITERT_VENV)) -c $(LOCK) $(TORCH_FLAGS) "$(TORCH_SPEC)"
	$(call PIP,$(LITERT_VENV)) -c $(LOCK) --build-constraint $(LOCK) -e ".[test]"
	$(call PIP,$(LITERT_VENV)) -c $(LOCK) --no-deps $(NO_DEPS)
	$(call PIP,$(LITERT_VENV)) -r $(LITERT_LOCK) "$(TORCH_SPEC)"
	touch $@

test-litert: $(LITERT_VENV)/.installed
	MEDSEG_REQUIRE_LITERT=1 $(LITERT_VENV)/bin/python -m pytest tests/deploy/test_litert.py $(PYTEST_ARGS)

lock:
	rm -rf $(LATEST_VENV)
	$(MAKE) $(LATEST_VENV)/.installed LATEST_TORCH_SPEC="$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python tools/lock.py freeze -o $(LOCK)
	rm -rf $(LATEST_VENV)

test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) $(LATEST_VENV)/.installed
	$(LATEST_VENV)/bin/python tools/lock.py diff $(LOCK)
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf demo_output .pytest_cache $(TV_VENV) $(LITERT_VENV)
