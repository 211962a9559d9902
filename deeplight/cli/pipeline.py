"""`deeplight pipeline compile | run-local | submit | schedule`: the KFP pipelines (pipelines/deeplight_pipeline.py,
`--pipeline fanout`: pipelines/fanout_pipeline.py, per-file data steps; `--pipeline sweep`:
pipelines/sweep_pipeline.py) from the command line. This module and the components are the
only deeplight code that imports kfp (lazily).

    deeplight pipeline compile [--pipeline sweep] [--out FILE] [--image REGISTRY/deeplight:TAG] [--gpus N]
    deeplight pipeline run-local [--input FILE ...] [--rows 300000] [--epochs 2] [pipeline settings]
    deeplight pipeline run-local --pipeline fanout --input day_0.txt day_1.txt ... [pipeline settings]
    deeplight pipeline submit --host https://kfp.example.com --input s3://bucket/day_0.gz [--image ...] [settings]
    deeplight pipeline schedule --cron '0 2 * * *' --host URL --input s3://bucket/latest.gz [settings]

compile, submit and schedule compile in the pods' CPU/memory requests and limits and GPUs (Config section
`cluster`, `--set cluster.KEY=VALUE`, `--gpus N`; components/resources.py); `schedule` uploads the package as
a new version of the KFP pipeline and creates a recurring run of it.

`run-local` (what `make run` does) runs the whole pipeline with kfp.local.SubprocessRunner in this venv: with
no --input it generates the synthetic Criteo file once (data/default/), tracks into the embedded MLflow store
under ./mlruns (absolute path, passed to the steps through the environment), then prints the dense vs pruned
table read back from MLflow. While it runs, the terminal shows one line per step start and end (status,
duration) and the steps' progress lines; everything else (KFP's executor output) goes to
PIPELINE_ROOT/RUN_NAME.log (`--verbose` streams it all). `submit` uploads the compiled pipeline with kfp.Client
and starts a run; the steps then read S3 and log to the MLflow server named by the cluster's environment (README:
cluster set-up).

Pipeline settings (both commands): --dataset, --split, --split-mode, --seed, --min-count | --buckets,
--epochs, --dnn/--field/--embedding sparsity, --mode, --ramp-epochs, --finetune-epochs, --set SECTION.KEY=VALUE
(dotted Config overrides), --model-name, --promote, --tolerance, --latency-slo-us, --run-name.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from deeplight.base.errors import DeeplightError
from deeplight.base.redact import redact

DEFAULT_YAML = Path("pipelines") / "deeplight_pipeline.yaml"  # relative: where a checkout keeps it
DEFAULT_ROWS = 300_000
# make run: sized so that the whole pipeline takes a few minutes on 2 idle cores. On 300k rows the dense
# model's valid AUC peaks after the first epoch even with the default weight decay (on 1M rows: ~8 epochs,
# bench/RESULTS.md), so 2 epochs are enough; pruning ramps over one epoch and fine-tunes one more at the
# paper's operating point (90% DNN, 90% field pairs, 40% embeddings).
LOCAL_DEFAULTS = {"epochs": 2, "ramp_epochs": 1.0, "finetune_epochs": 1}

# CLI flag -> pipeline parameter
_FLAGS = {
    "dataset": "dataset", "split": "split", "split_mode": "split_mode", "seed": "seed", "min_count": "min_count",
    "buckets": "buckets", "epochs": "epochs", "dnn": "dnn_sparsity", "field": "field_sparsity",
    "embedding": "embedding_sparsity", "mode": "prune_mode", "ramp_epochs": "ramp_epochs",
    "finetune_epochs": "finetune_epochs", "model_name": "model_name",
    "promote": "promote_model", "tolerance": "promote_tolerance", "latency_slo_us": "latency_slo_us",
    "run_name": "run_name", "train_workers": "train_workers",
}


# --- compile ---------------------------------------------------------------------------------------------

# --pipeline NAME -> (module in pipelines/, where a checkout keeps its compiled YAML)
PIPELINES = {"deeplight": ("deeplight_pipeline", DEFAULT_YAML),
             "fanout": ("fanout_pipeline", Path("pipelines") / "fanout_pipeline.yaml"),
             "sweep": ("sweep_pipeline", Path("pipelines") / "sweep_pipeline.yaml")}


def pipeline_function(pipeline: str = "deeplight", cluster: Any = None) -> Any:
    """The pipeline named `pipeline` (deeplight | fanout | sweep), its pods sized by `cluster` (a ClusterConfig; default:
    Config().cluster, the committed YAML's)."""
    import importlib

    if pipeline not in PIPELINES:
        raise DeeplightError(f"--pipeline {pipeline!r}: choose one of {', '.join(PIPELINES)}")
    module = importlib.import_module(f"pipelines.{PIPELINES[pipeline][0]}")
    return module.build(cluster) if cluster is not None else getattr(module, PIPELINES[pipeline][0])


def compile_pipeline(out: str | Path | None = None, image: str | None = None, pipeline: str = "deeplight",
                     cluster: Any = None) -> Path:
    """Compile a pipeline (deeplight | sweep) to IR YAML; `image` replaces the image of every step (a registry
    image for a cluster), `cluster` (a ClusterConfig) sizes its pods. Without them the YAML is byte-identical to
    the committed one (pipelines/deeplight_pipeline.yaml, pipelines/sweep_pipeline.yaml)."""
    from kfp import compiler

    function = pipeline_function(pipeline, cluster)
    out = Path(out or PIPELINES[pipeline][1])
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(function, str(out))
    if image:
        _set_image(out, image)
    return out


def _set_image(path: Path, image: str) -> None:
    import yaml

    docs = list(yaml.safe_load_all(path.read_text()))
    for executor in docs[0]["deploymentSpec"]["executors"].values():
        executor["container"]["image"] = image
    with open(path, "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=True)


# --- parameters ------------------------------------------------------------------------------------------

def pipeline_arguments(a: argparse.Namespace, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pipeline's arguments from CLI flags (unset flags: `defaults`, then the pipeline's defaults),
    validated now by building the run's Config, so a bad setting fails before anything runs."""
    from deeplight.steps.pipeline import parse_split

    args: dict[str, Any] = dict(defaults or {})
    for flag, param in _FLAGS.items():
        value = getattr(a, flag, None)
        if value is not None and value is not False:
            args[param] = value
    if getattr(a, "input", None):
        args["input_uris"] = list(a.input)
    if getattr(a, "set_items", None):  # --set: the pipeline's config_overrides parameter (a JSON object)
        from deeplight.base.config import parse_sets

        args["config_overrides"] = json.dumps(parse_sets(a.set_items))
    if "split" in args:
        args["split"] = ",".join(str(x) for x in parse_split(args["split"]))
    config_of(args)
    return args


def config_of(args: dict[str, Any]):
    """The run's Config from the pipeline's arguments (what `start_run` will build); checked."""
    from deeplight.steps.pipeline import pipeline_config

    return pipeline_config(**{k: args.get(k) for k in ("dataset", "split", "split_mode", "seed", "min_count",
                                                        "buckets", "epochs", "dnn_sparsity", "field_sparsity",
                                                        "embedding_sparsity", "prune_mode", "ramp_epochs",
                                                        "finetune_epochs")},
                           overrides=args.get("config_overrides"))


# --- run locally -----------------------------------------------------------------------------------------

def default_input(rows: int = DEFAULT_ROWS, seed: int = 0, data_root: str | Path = "data/default",
                  dataset: str = "criteo") -> Path:
    """The synthetic data of `make run` for `dataset` (criteo or avazu), generated on first use."""
    from deeplight.data.synth import synthesize

    name = f"criteo-synth-{rows}-seed{seed}/raw.txt" if dataset == "criteo" else \
        f"{dataset}-synth-{rows}-seed{seed}/raw.csv"
    raw = Path(data_root).absolute() / name
    if not raw.exists():
        print(f"generating {rows:,} synthetic {dataset} rows -> {raw} (first use only)", flush=True)
        raw.parent.mkdir(parents=True, exist_ok=True)
        synthesize(dataset, rows=rows, seed=seed, out=str(raw))
    return raw


def local_environment(mlruns: str | Path | None = None) -> dict[str, str]:
    """Environment for local steps (they inherit this process's): the embedded MLflow store as an absolute
    path unless MLFLOW_TRACKING_URI names a server; telemetry off."""
    env = {"MLFLOW_DISABLE_TELEMETRY": "true"}
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        env["DEEPLIGHT_MLRUNS"] = str(Path(mlruns or os.environ.get("DEEPLIGHT_MLRUNS") or "mlruns").absolute())
    os.environ.update(env)
    return env


class StepLog(io.TextIOBase):
    """What run-local writes while KFP runs the steps: every line (KFP's executor output, each step's own output)
    goes to a log file; the terminal gets a concise account: each step's start, its end with status and duration,
    progress lines (`deeplight.base.progress`), sweep trials, errors. `verbose`: the terminal gets everything."""

    _TASK = re.compile(r"Executing task '?([\w-]+)'?|Task '?([\w-]+)'? finished with status (\w+)")
    _ECHO = re.compile(r"^(?:sweep \S+: trial|deeplight: error|prune: |epoch \d)|, [\d.]+[kMG]? \S+/s, ")
    _ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, path: Path, out: Any, verbose: bool = False, clock: Any = time.monotonic):
        self.file = open(path, "a", encoding="utf-8")
        self.out, self.verbose, self.clock = out, verbose, clock
        self.partial = ""
        self.started: dict[str, float] = {}

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.file.write(text)
        if self.verbose:
            self.out.write(text)
            return len(text)
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            self._line(self._ANSI.sub("", line))
        return len(text)

    def _line(self, line: str) -> None:
        m = self._TASK.search(line)
        if m and m.group(1):
            self.started[m.group(1)] = self.clock()
            self.out.write(f"{m.group(1)}: started\n")
        elif m:
            took = self.clock() - self.started.get(m.group(2), self.clock())
            self.out.write(f"{m.group(2)}: {m.group(3)} in {took:.0f} s\n")
        elif self._ECHO.search(line.strip()):
            self.out.write(f"    {line.strip()}\n")
        else:
            return
        self.out.flush()

    def flush(self) -> None:
        if not self.file.closed:
            self.file.flush()
        self.out.flush()

    def close(self) -> None:
        if self.partial:
            self._line(self._ANSI.sub("", self.partial))
            self.partial = ""
        self.file.close()
        super().close()


def run_local(arguments: dict[str, Any], pipeline_root: str | Path = "out/kfp",
              mlruns: str | Path | None = None, verbose: bool = True, pipeline: str = "deeplight") -> dict[str, Any]:
    """Run the pipeline (deeplight, or fanout: per-file data steps) with kfp.local.SubprocessRunner in this venv;
    returns the summary read from MLflow.
    A failed step raises DeeplightError with the step's own message (also on the MLflow parent run).

    `verbose=False`: KFP's and the steps' output goes to `<pipeline_root>/<run name>.log` (summary["log"]) and
    the terminal shows a concise account (`StepLog`)."""
    from kfp import local

    local_environment(mlruns)
    arguments = dict(arguments)
    arguments["input_uris"] = [u if "://" in u else str(Path(u).absolute()) for u in arguments["input_uris"]]
    # A unique MLflow run name saying what the run trains (dataset, model, sparsity targets, date), with a random
    # suffix: how this process finds the parent run the pipeline opened.
    if not arguments.get("run_name"):
        from deeplight.steps.pipeline import pipeline_run_name

        arguments["run_name"] = pipeline_run_name(config_of(arguments), suffix=uuid.uuid4().hex[:4])
    root = Path(pipeline_root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    if pipeline not in ("deeplight", "fanout"):
        raise DeeplightError(f"run-local --pipeline {pipeline!r}: choose deeplight or fanout")
    function = pipeline_function(pipeline)
    started = time.perf_counter()
    log_path = root / f"{arguments['run_name']}.log"
    # KFP's local runner prints the steps' output and its own log lines to sys.stdout (looked up at each call)
    step_log = None if verbose else StepLog(log_path, sys.stdout)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(step_log or sys.stdout):
            # Expected here, once per step: the steps run in this venv, not in the image they name, and
            # display names and pod resources (CPU/memory requests and limits) only apply on a cluster.
            warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
            warnings.filterwarnings("ignore", message=r".*settings \[.*\] have no effect in the current local runner")
            function(**arguments)
    except RuntimeError as e:
        where = f" (every step's output: {log_path})" if step_log else ""
        raise DeeplightError(_failure_message(arguments["run_name"], e) + where) from None
    finally:
        if step_log is not None:
            step_log.close()
    summary = summarize(arguments["run_name"])
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["pipeline_root"] = str(root)
    if step_log is not None:
        summary["log"] = str(log_path)
    return summary


def _failure_message(run_name: str, error: Exception) -> str:
    from deeplight.steps.pipeline import ERROR_TAG, find_pipeline_run

    run = find_pipeline_run(run_name=run_name)
    detail = run.data.tags.get(ERROR_TAG) if run is not None else None
    where = f" (MLflow run {run.info.run_id})" if run is not None else ""
    return redact(f"pipeline failed{where}: {detail or error}")  # a step's error may quote the tracking URI


# --- the summary table -----------------------------------------------------------------------------------

def summarize(run_name: str = "", parent_run_id: str = "") -> dict[str, Any]:
    """What MLflow holds for one pipeline run: the parent run, its child runs by step, the registered
    version, and the dense vs pruned rows of the table."""
    from deeplight.steps.pipeline import REGISTERED_TAG, find_pipeline_run
    from deeplight.ops.tracking import client, experiment_id, tracking_uri

    c = client()
    parent = c.get_run(parent_run_id) if parent_run_id else find_pipeline_run(run_name=run_name)
    if parent is None:
        raise DeeplightError(f"no MLflow pipeline run named {run_name!r} in {redact(tracking_uri())}")
    children = c.search_runs([experiment_id(c)], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                             order_by=["attributes.start_time ASC"])
    m = parent.data.metrics
    rows = {}
    for variant in ("dense", "pruned"):
        rows[variant] = {k[len(variant) + 1:]: v for k, v in m.items() if k.startswith(variant + "_")}
    return {
        "run_name": parent.info.run_name, "parent_run_id": parent.info.run_id, "status": parent.info.status,
        "children": {step_of(r): r.info.run_id for r in children},
        "registered": parent.data.tags.get(REGISTERED_TAG, ""),
        "rows": rows, "tracking_uri": redact(tracking_uri()),  # printed: never user:password@
    }


def step_of(run: Any) -> str:
    """Which step a child run is (`ingest`, `train`, `evaluate-dense`, `register`...): its step tag (and
    variant, for evaluations), whatever its descriptive name."""
    from deeplight.steps.pipeline import STEP_TAG, VARIANT_TAG

    tags = run.data.tags
    step = tags.get(STEP_TAG) or tags.get("stage") or run.info.run_name
    return f"{step}-{tags[VARIANT_TAG]}" if step == "evaluate" and tags.get(VARIANT_TAG) else step


# (column, metric on the parent run without the variant prefix, scale, format): what deeplight.evaluation.evaluate measured
TABLE_COLUMNS = (("test AUC", "test_auc", 1, "{:.4f}"), ("test logloss", "test_logloss", 1, "{:.4f}"),
                 ("latency batch 1 (us)", "latency_us_b1", 1, "{:.1f}"),
                 ("latency batch 4096 (ms)", "latency_us_b4096", 1e-3, "{:.2f}"),
                 ("size (KB)", "model_bytes", 1 / 1024, "{:,.0f}"),
                 ("nonzero params", "params_nonzero", 1, "{:,.0f}"))


def table_lines(summary: dict[str, Any]) -> list[str]:
    """The dense vs pruned table (markdown) from the summary's rows."""
    lines = ["| model | " + " | ".join(c[0] for c in TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for variant, row in summary["rows"].items():
        cells = ["n/a" if row.get(key) is None else fmt.format(row[key] * scale)
                 for _, key, scale, fmt in TABLE_COLUMNS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def print_summary(summary: dict[str, Any]) -> None:
    print()
    print("\n".join(table_lines(summary)))
    print(f"\nMLflow: parent run {summary['run_name']} ({summary['parent_run_id']}, {summary['status']}) with "
          f"child runs {', '.join(summary['children'])}; store {summary['tracking_uri']}")
    if summary["registered"]:
        print(f"registered model version {summary['registered']} (alias challenger)")
    if "seconds" in summary:
        print(f"pipeline took {summary['seconds']:.0f} s; step outputs under {summary['pipeline_root']}")
    if summary.get("log"):
        print(f"every step's output: {summary['log']} (--verbose streams it)")
    from deeplight.ops.tracking import client, experiment_id, ui_url

    print(f"Open the MLflow UI: make ui  (then http://127.0.0.1:5000; this experiment's runs in the model-training "
          f"view: {ui_url(experiment_id(client()))})")


# --- the sweep pipeline's arguments ----------------------------------------------------------------------

# flag -> sweep pipeline parameter (the flags the two pipelines share, then the sweep's own)
_SWEEP_FLAGS = {"dataset": "dataset", "split": "split", "seed": "seed", "min_count": "min_count",
                "epochs": "epochs", "ramp_epochs": "ramp_epochs", "model_name": "model_name", "run_name": "run_name",
                "n_trials": "n_trials", "workers": "workers", "study": "study", "storage": "storage",
                "sampler": "sampler"}
# --set sweep.KEY=VALUE -> sweep pipeline parameter, and how the value is written
_SWEEP_SETS = {"sweep.study": ("study", str), "sweep.n_trials": ("n_trials", int), "sweep.sampler": ("sampler", str),
               "sweep.tolerance": ("tolerance", float), "sweep.latency_calls": ("latency_calls", int),
               "sweep.dnn": ("dnn_range", None), "sweep.field": ("field_range", None),
               "sweep.embedding": ("embedding_range", None), "sweep.finetune_epochs": ("finetune_range", None),
               "sweep.modes": ("modes", None)}


def _joined(value: Any, sep: str) -> str:
    return sep.join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def sweep_arguments(a: argparse.Namespace) -> dict[str, Any]:
    """The sweep pipeline's arguments (pipelines/sweep_pipeline.py) from CLI flags: the settings it shares with
    the deeplight pipeline, --n-trials/--workers/--study/--storage/--sampler, and `--set sweep.KEY=VALUE` for
    the search space (sweep.dnn=[0.5,0.95], sweep.modes=["structured"], sweep.tolerance=0.002...). Checked now:
    the run's Config and the sweep's settings, so a bad one fails before anything is submitted."""
    from urllib.parse import urlsplit

    from deeplight.base.config import parse_sets
    from deeplight.steps.pipeline import parse_split, pipeline_config
    from deeplight.steps.sweep import pipeline_settings

    others = sorted(f"--{f.replace('_', '-')}" for f in _FLAGS
                    if f not in _SWEEP_FLAGS and getattr(a, f, None) not in (None, False))
    if others:
        raise DeeplightError(f"{', '.join(others)}: not settings of the sweep pipeline (it searches the sparsity "
                             "targets and mode; set their ranges with --set sweep.dnn=[LOW,HIGH] ...)")
    args: dict[str, Any] = {p: getattr(a, f) for f, p in _SWEEP_FLAGS.items() if getattr(a, f, None) is not None}
    if getattr(a, "input", None):
        args["input_uris"] = list(a.input)
    sets = parse_sets(getattr(a, "set_items", None))
    if sets:
        args["config_overrides"] = json.dumps(sets)
    for key, (param, kind) in _SWEEP_SETS.items():
        if key in sets:
            args[param] = kind(sets[key]) if kind else _joined(sets[key], "," if param == "modes" else ":")
    if "split" in args:
        args["split"] = ",".join(str(x) for x in parse_split(args["split"]))
    if urlsplit(args.get("storage", "")).password:
        raise DeeplightError("--storage: a password would be stored in the run's parameters; leave --storage out "
                             "and give the step pods $DEEPLIGHT_OPTUNA_STORAGE (README: On a cluster)")
    pipeline_config(**{k: args.get(k) for k in ("dataset", "split", "seed", "min_count", "epochs", "ramp_epochs")},
                    overrides=args.get("config_overrides"))
    pipeline_settings(args.get("study") or "check", **{k: args[k] for k in ("n_trials", "sampler", "tolerance", "dnn_range",
                                               "field_range", "embedding_range", "modes", "finetune_range",
                                               "latency_calls") if k in args}).validate()
    if args.get("workers", 1) < 1:
        raise DeeplightError(f"--workers: want at least 1, got {args['workers']}")
    return args


def cluster_from(a: argparse.Namespace) -> Any:
    """The ClusterConfig to compile with: Config().cluster, `--set cluster.KEY=VALUE` and --gpus; None when
    nothing was given (the committed pipeline's sizes)."""
    from deeplight.base.config import Config, parse_sets

    sets = {k: v for k, v in parse_sets(getattr(a, "set_items", None)).items() if k.startswith("cluster.")}
    if getattr(a, "gpus", None) is not None:
        sets["cluster.gpus"] = a.gpus
    return Config().replace(**sets).cluster if sets else None


def arguments_for(a: argparse.Namespace) -> dict[str, Any]:
    """The chosen pipeline's arguments (`--pipeline deeplight | sweep`). With --gpus and no --device, the
    training steps run with train.device=cuda: a pod whose torch cannot see its GPU then fails instead of
    training on its CPU."""
    if getattr(a, "gpus", None) and not any(s.startswith("train.device=") for s in a.set_items or []):
        a.set_items = ["train.device=cuda", *(a.set_items or [])]
    if a.pipeline == "sweep":
        return sweep_arguments(a)
    sweep_only = [f"--{f.replace('_', '-')}" for f in ("n_trials", "workers", "study", "storage", "sampler")
                  if getattr(a, f, None) is not None]
    if sweep_only:
        raise DeeplightError(f"{', '.join(sweep_only)}: settings of the sweep pipeline (--pipeline sweep)")
    return pipeline_arguments(a)


# --- submit to a cluster, or schedule it -----------------------------------------------------------------

def _client(host: str | None, namespace: str | None) -> Any:
    import kfp

    with warnings.catch_warnings():  # "only works with KFP v2.0.0-beta.2 and later": on every call
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=host, namespace=namespace, existing_token=os.environ.get("KFP_TOKEN") or None)


@contextlib.contextmanager
def _package(what: str, host: str | None, arguments: dict[str, Any], package: str | Path | None,
             image: str | None, pipeline: str, cluster: Any) -> Any:
    """The pipeline package to send (compiled now without `package`, or with `image` or `cluster`), after the
    checks that need no server; the server's errors as one DeeplightError."""
    if not arguments.get("input_uris"):
        raise DeeplightError(f"{what}: give the input data with --input (s3:// URIs the cluster can read)")
    if not (host or os.environ.get("KF_PIPELINES_ENDPOINT")):
        raise DeeplightError(f"{what}: give the KFP API with --host URL (or KF_PIPELINES_ENDPOINT)")
    with tempfile.TemporaryDirectory() as tmp:
        if package is None or image or cluster is not None:
            if package is not None:
                raise DeeplightError(f"{what}: --image, --gpus and --set cluster.* recompile the pipeline; do not "
                                     "combine them with --package")
            package = compile_pipeline(Path(tmp) / f"{pipeline}.yaml", image=image, pipeline=pipeline,
                                       cluster=cluster)
        elif not Path(package).is_file():
            raise DeeplightError(f"{package}: no such pipeline package")
        try:
            yield str(package)
        except Exception as e:  # connection refused, 4xx/5xx from the API: the user's host or cluster
            if type(e).__module__.split(".")[0] in ("kfp", "kfp_server_api", "urllib3", "requests"):
                raise DeeplightError(f"{what} to {host}: {type(e).__name__}: {str(e).strip()[:500]}") from None
            raise


def submit(host: str | None, arguments: dict[str, Any], package: str | Path | None = None,
           image: str | None = None, experiment: str = "deeplight", run_name: str | None = None,
           namespace: str | None = None, pipeline: str = "deeplight", cluster: Any = None) -> dict[str, Any]:
    """Start a run of `pipeline` (deeplight | sweep) with `arguments` on the KFP API at `host`. Without
    `package`, or with `image` or `cluster`, the pipeline is compiled now. A bearer token, when needed, comes
    from the environment variable KFP_TOKEN (never a flag: it would end up in shell history)."""
    with _package("submit", host, arguments, package, image, pipeline, cluster) as path:
        result = _client(host, namespace).create_run_from_pipeline_package(
            path, arguments=arguments, run_name=run_name or arguments.get("run_name") or None,
            experiment_name=experiment, namespace=namespace, enable_caching=False)
    run_id = result.run_id
    return {"run_id": run_id, "run_url": f"{(host or '').rstrip('/')}/#/runs/details/{run_id}",
            "experiment": experiment, "arguments": arguments, "pipeline": pipeline}


def cron_expression(text: str) -> str:
    """KFP's cron has a seconds field first: a usual 5-field expression (`0 2 * * *`, 02:00 every day) gets
    `0 ` in front; 6 fields are taken as they are."""
    fields = text.split()
    if len(fields) == 5:
        fields.insert(0, "0")
    if len(fields) != 6:
        raise DeeplightError(f"--cron {text!r}: want 5 fields (minute hour day-of-month month day-of-week, e.g. "
                             "'0 2 * * *') or KFP's 6 (seconds first)")
    return " ".join(fields)


def schedule(host: str | None, arguments: dict[str, Any], cron: str, name: str | None = None,
             package: str | Path | None = None, image: str | None = None, experiment: str = "deeplight",
             namespace: str | None = None, pipeline: str = "deeplight", cluster: Any = None,
             max_concurrency: int = 1, catchup: bool = False) -> dict[str, Any]:
    """A recurring run of `pipeline` on the KFP API at `host`: the package is uploaded as a new version of the
    KFP pipeline named like it (created on first use), then a recurring run of that version is created in
    `experiment` with `arguments`, on the `cron` schedule (`cron_expression`), at most `max_concurrency` runs
    at a time, without catching up missed runs unless `catchup`. Caching is off, as for `submit`."""
    cron = cron_expression(cron)
    if max_concurrency < 1:
        raise DeeplightError(f"--max-concurrency: want at least 1, got {max_concurrency}")
    with _package("schedule", host, arguments, package, image, pipeline, cluster) as path:
        import yaml

        pipeline_name = yaml.safe_load(Path(path).read_text())["pipelineInfo"]["name"]
        version = f"{pipeline_name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        client = _client(host, namespace)
        pipeline_id = client.get_pipeline_id(pipeline_name)
        if pipeline_id is None:  # the first upload creates the pipeline with this package as its first version
            pipeline_id = client.upload_pipeline(path, pipeline_name=pipeline_name, namespace=namespace).pipeline_id
            version_id = client.list_pipeline_versions(pipeline_id).pipeline_versions[0].pipeline_version_id
        else:
            version_id = client.upload_pipeline_version(path, version, pipeline_id=pipeline_id).pipeline_version_id
        experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
        job = name or f"{pipeline_name}-recurring"
        created = client.create_recurring_run(
            experiment_id, job, cron_expression=cron, params=arguments, pipeline_id=pipeline_id,
            version_id=version_id, max_concurrency=max_concurrency, no_catchup=not catchup, enable_caching=False)
    return {"recurring_run_id": created.recurring_run_id, "name": job, "cron": cron, "pipeline": pipeline,
            "pipeline_id": pipeline_id, "pipeline_version_id": version_id, "experiment": experiment,
            "url": f"{(host or '').rstrip('/')}/#/recurringrun/details/{created.recurring_run_id}",
            "arguments": arguments}


# --- argparse (no kfp import: `deeplight --help` stays fast) ---------------------------------------------

class _DeviceSetting(argparse.Action):
    """--device X: `train.device=X` in front of the --set items (an explicit --set train.device still wins)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, value: Any, option: Any = None) -> None:
        namespace.set_items = [f"train.device={value}", *(getattr(namespace, "set_items", None) or [])]


def add_cluster_options(sp: argparse.ArgumentParser) -> None:
    """--pipeline and the compile-time pod settings (compile, submit, schedule)."""
    from deeplight.cli.options import DEFAULTS as D

    sp.add_argument("--pipeline", choices=sorted(PIPELINES), default="deeplight",
                    help="deeplight (train, prune, evaluate, register), fanout (the same with per-file data "
                         "steps in parallel) or sweep (Optuna sparsity sweep)")
    sp.add_argument("--gpus", type=int, help=f"GPUs ({D.cluster.gpu_type}) for each train, prune and sweep worker "
                                             "pod (needs an image with a CUDA build of torch; default: none)")


def add_remote_options(sp: argparse.ArgumentParser, input_note: str = "") -> None:
    """submit's and schedule's options: the KFP API, the data, the package, and every setting of both pipelines."""
    sp.add_argument("--host", help="KFP API URL (default: $KF_PIPELINES_ENDPOINT); token from $KFP_TOKEN")
    sp.add_argument("--input", nargs="+", help=f"raw files the cluster can read (s3://bucket/key){input_note}")
    sp.add_argument("--package", help="a compiled pipeline YAML (default: compile now)")
    sp.add_argument("--image", help="image of every step, e.g. REGISTRY/deeplight:TAG (compiles now)")
    sp.add_argument("--experiment", default="deeplight", help="KFP experiment")
    sp.add_argument("--namespace", help="Kubeflow namespace (multi-user clusters)")
    add_cluster_options(sp)
    add_pipeline_settings(sp)
    add_sweep_settings(sp)


def add_sweep_settings(sp: argparse.ArgumentParser) -> None:
    from deeplight.cli.options import DEFAULTS as D

    g = sp.add_argument_group("sweep pipeline settings (--pipeline sweep; the search space: --set sweep.dnn=[LOW,"
                              "HIGH], sweep.field, sweep.embedding, sweep.modes, sweep.finetune_epochs, "
                              "sweep.tolerance)")
    g.add_argument("--n-trials", type=int, help=f"COMPLETE trials over all workers (default {D.sweep.n_trials})")
    g.add_argument("--workers", type=int, help="parallel sweep worker pods (default 2)")
    g.add_argument("--study", help="Optuna study name; a name given again resumes it (default: sweep-<KFP run id>)")
    g.add_argument("--storage", help="Optuna RDB URL every worker reaches, without a password (default: the pods' "
                                     "$DEEPLIGHT_OPTUNA_STORAGE)")
    g.add_argument("--sampler", choices=["tpe", "nsga2", "random"], help=f"default {D.sweep.sampler}")


def add_pipeline_settings(sp: argparse.ArgumentParser) -> None:
    from deeplight.cli.options import DEFAULTS as D
    from deeplight.cli.options import add_set

    g = sp.add_argument_group("pipeline settings (defaults: deeplight's Config)")
    g.add_argument("--dataset", help=f"schema name: criteo | avazu (default {D.data.dataset})")
    g.add_argument("--split", help="train,valid,test fractions (default " + ",".join(map(str, D.data.split)) + ")")
    g.add_argument("--split-mode", choices=["random", "sequential"], help=f"default {D.data.split_mode}")
    g.add_argument("--seed", type=int, help=f"data split and training seed (default {D.train.seed})")
    h = g.add_mutually_exclusive_group()
    h.add_argument("--min-count", type=int,
                   help=f"vocabulary of values seen >= K times in train (default {D.features.min_count})")
    h.add_argument("--buckets", type=int, help="stable hashing into N buckets per field instead")
    g.add_argument("--epochs", type=int, help="dense training epochs (default: " +
                   ", ".join(f"{k} {v}" for k, v in (("Config", D.train.epochs), ("run-local", LOCAL_DEFAULTS["epochs"]))) + ")")
    g.add_argument("--dnn", type=float, help=f"DNN sparsity target (default {D.prune.dnn})")
    g.add_argument("--field", type=float, help=f"field-pair sparsity target (default {D.prune.field})")
    g.add_argument("--embedding", type=float, help=f"embedding sparsity target (default {D.prune.embedding})")
    g.add_argument("--mode", choices=["unstructured", "structured"], help=f"pruning mode (default {D.prune.mode})")
    g.add_argument("--ramp-epochs", type=float, help=f"epochs over which sparsity ramps up (default {D.prune.ramp_epochs})")
    g.add_argument("--finetune-epochs", type=int,
                   help=f"epochs at full sparsity after the ramp (default {D.prune.finetune_epochs})")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], action=_DeviceSetting,
                   help=f"where train and prune run (Config train.device, default {D.train.device}: a CUDA GPU "
                        "when torch sees one; with --gpus: cuda)")
    add_set(g)
    g.add_argument("--model-name", help=f"registered model name (default {D.registry.model_name})")
    g.add_argument("--promote", action="store_true", help="run the promotion gate after registering")
    g.add_argument("--tolerance", type=float, help=f"promotion: max AUC drop vs the champion (default {D.promote.tolerance})")
    g.add_argument("--latency-slo-us", type=float, help="promotion: SLO on the served latency of one raw row, microseconds (default: none)")
    g.add_argument("--run-name", help="MLflow parent run name (default: generated)")
    g.add_argument("--train-workers", type=int,
                   help="pods of the train and prune steps: > 1 runs each as a Kubeflow PyTorchJob of that many ranks "
                        f"(README: On a cluster; default {D.cluster.train_workers}: the step's own pod)")


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    sp = sub.add_parser("compile", help="compile the pipeline to KFP IR YAML",
                        description="compile the pipeline to KFP IR YAML")
    sp.add_argument("--out", help="default: pipelines/deeplight_pipeline.yaml (--pipeline sweep: "
                                  "pipelines/sweep_pipeline.yaml)")
    sp.add_argument("--image", help="image of every step (default deeplight:local), e.g. REGISTRY/deeplight:TAG")
    add_cluster_options(sp)
    sp.add_argument("--set", action="append", metavar="cluster.KEY=VALUE", dest="set_items",
                    help="pod settings (Config section cluster), e.g. cluster.train='[\"8\",\"8\",\"16Gi\",\"16Gi\"]' "
                         "(CPU request, CPU limit, memory request, memory limit); repeatable")

    sp = sub.add_parser("run-local", help="run the whole pipeline locally (kfp.local), tracked in ./mlruns",
                        description="run the whole pipeline locally with kfp.local.SubprocessRunner (make run)")
    sp.add_argument("--input", nargs="+", help="raw files (default: synthetic Criteo, generated on first use)")
    sp.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows of the default synthetic data")
    sp.add_argument("--pipeline-root", default="out/kfp", help="where step outputs go")
    sp.add_argument("--pipeline", choices=["deeplight", "fanout"], default="deeplight",
                    help="fanout: ingest and feature ids per input file in parallel (KFP ParallelFor), then the "
                         "same steps; the same hashed data as deeplight")
    sp.add_argument("--verbose", action="store_true",
                    help="stream KFP's and every step's output (default: a line per step and progress; the rest "
                         "goes to PIPELINE_ROOT/RUN_NAME.log)")
    add_pipeline_settings(sp)

    sp = sub.add_parser("submit", help="upload the pipeline to a KFP cluster and start a run",
                        description="upload the compiled pipeline to a KFP API (kfp.Client) and start a run")
    add_remote_options(sp)

    sp = sub.add_parser("schedule", help="upload the pipeline to a KFP cluster and create a recurring run (cron)",
                        description="upload the compiled pipeline as a new version of the KFP pipeline and create "
                                    "a recurring run of it (kfp.Client.create_recurring_run)")
    sp.add_argument("--cron", required=True, help="when: '0 2 * * *' (02:00 every day; KFP's 6-field form, "
                                                  "seconds first, is taken as is)")
    sp.add_argument("--name", help="the recurring run's name (default: PIPELINE-recurring)")
    sp.add_argument("--max-concurrency", type=int, default=1, help="runs of the schedule at a time (default 1)")
    sp.add_argument("--catchup", action="store_true", help="start the runs missed while paused (default: skip)")
    add_remote_options(sp, " (read anew by every run)")


def main(a: argparse.Namespace) -> None:
    if a.pipeline_command == "compile":
        if any(not item.startswith("cluster.") for item in a.set_items or []):
            raise DeeplightError("compile --set: only cluster.* settings are compiled in (the others are run "
                                 "parameters: give them to run-local, submit or schedule)")
        print(compile_pipeline(a.out, image=a.image, pipeline=a.pipeline, cluster=cluster_from(a)))
    elif a.pipeline_command == "run-local":
        arguments = pipeline_arguments(a, dict(LOCAL_DEFAULTS))  # every setting checked before any work
        if not a.input:
            seed = a.seed if a.seed is not None else 0
            arguments["input_uris"] = [str(default_input(a.rows, seed, dataset=config_of(arguments).data.dataset))]
        summary = run_local(arguments, pipeline_root=a.pipeline_root, verbose=a.verbose, pipeline=a.pipeline)
        print_summary(summary)
    elif a.pipeline_command == "submit":
        result = submit(a.host, arguments_for(a), package=a.package, image=a.image, experiment=a.experiment,
                        run_name=a.run_name, namespace=a.namespace, pipeline=a.pipeline, cluster=cluster_from(a))
        print(json.dumps(result, indent=2, sort_keys=True))
    elif a.pipeline_command == "schedule":
        result = schedule(a.host, arguments_for(a), a.cron, name=a.name, package=a.package, image=a.image,
                          experiment=a.experiment, namespace=a.namespace, pipeline=a.pipeline,
                          cluster=cluster_from(a), max_concurrency=a.max_concurrency, catchup=a.catchup)
        print(json.dumps(result, indent=2, sort_keys=True))
