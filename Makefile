# Two commands on a fresh machine: `make run` and `make test`. Each installs first if needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true

IMAGE ?= deeplight:local

.PHONY: install run test bench ui clean image

install: $(STAMP)

# Re-install only when the dependency pins change (idempotent).
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

# The whole KFP pipeline on the embedded default (kfp.local.SubprocessRunner): synthetic Criteo data generated on
# first use, tracked in mlruns/, then the dense vs pruned table read back from MLflow and how to open `make ui`.
run: $(STAMP)
	$(BIN)/deeplight pipeline run-local

# One pytest worker per CPU (at most TEST_WORKERS), each taking whole test files (--dist loadfile: a file's
# module-scoped fixtures, e.g. a pipeline run, are built once) in the order tests/conftest.py sets: doctests,
# then the files longest first (tests/durations.json). On 2 CPUs ~17 min instead of ~26. `make test
# TEST_WORKERS=0`: one process.
TEST_WORKERS ?= 4
test: $(STAMP)
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n logical --maxprocesses $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

ui: $(STAMP)
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root ./mlruns/artifacts

# The component image without a registry (docker/README.md). Needs a Docker daemon: `bash .ci/docker.sh` (root).
image: $(STAMP)
	bash docker/build_image.sh $(IMAGE)

clean:
	rm -rf $(VENV) data out bench/out .pytest_cache docker/.wheelhouse
	find mlruns -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
