"""Optuna sparsity sweeps: the accuracy/latency Pareto front of DeepLight pruning, resumable and distributed.

    from deeplight.ops.sweep import SearchSpace, SweepSettings, run_sweep
    settings = SweepSettings(study="criteo", n_trials=20, space=SearchSpace(dnn=(0.5, 0.98)))
    summary = run_sweep("data/hashed", "out/sweep", settings)      # the same call again resumes the study
    summary["chosen"], summary["final"]["chosen_test"]["auc"]     # trial number, its test AUC

    deeplight sweep --data data/hashed --out out/sweep --n-trials 20 [--storage postgresql://...] [--register]

One multi-objective study over the `prune.*` settings of the Config (DNN, field-pair and embedding sparsity,
unstructured or structured, fine-tune epochs): maximize the pruned model's valid AUC, minimize the median
batch-1 latency of its compact engine (`CompactModel.score_one`, one thread) on real test ids (ids only, labels
are never read). The dense model is trained once (or given with `dense=`); every trial prunes from that
checkpoint on a view of the data without its test split, so trials can only see valid metrics; the test AUC of
the chosen trial is computed once, at the end.

MLflow: one sweep parent run (settings, dense baseline, Pareto plot + table, the choice, the final test AUC);
the dense training and every trial are child runs (trial params, both objectives, achieved sparsity, kept
field pairs). `TrialLogger` writes them: optuna_integration's MLflowCallback (deprecated) makes flat runs
after the fact, while here the child run is open during the trial so pruning logs its epochs into it.

Storage: Optuna's RDB storage, default `sqlite:///<mlruns>/optuna.db`; any SQLAlchemy URL (postgresql://...)
lets several workers (processes or pods) share one study. A worker starts a trial only while
COMPLETE + RUNNING < n_trials and stops once n_trials are COMPLETE; a trial that finds itself past the budget
(two workers raced for the last slot) ends at once as PRUNED without params (user attr `surplus`).

Resume: workers write a heartbeat to the storage every `heartbeat_interval` s; a RUNNING trial whose heartbeat
is older than `grace_period` (its worker was killed) is marked FAIL by the next worker that looks, and its
MLflow run FAILED. We chose the heartbeat over "mark every RUNNING trial FAIL at start-up" because that would
fail the live trials of other workers of a distributed study. Running the same command again loads the study
(its search space, base config and data must match), keeps its finished trials and continues until n_trials
are COMPLETE. Samplers are reseeded per trial from (seed, trial number): a run is reproducible, and neither a
second worker nor a resumed one replays the parameters of earlier trials.

Choice: the fastest COMPLETE trial whose valid AUC is within `tolerance` of the dense model's valid AUC.

    >>> pareto_front([(0.80, 10.0), (0.79, 5.0), (0.78, 6.0), (0.80, 12.0)])
    [0, 1]
    >>> rows = [{"number": 0, "state": "COMPLETE", "valid_auc": 0.800, "latency_us": 9.0},
    ...         {"number": 1, "state": "COMPLETE", "valid_auc": 0.7995, "latency_us": 4.0},
    ...         {"number": 2, "state": "COMPLETE", "valid_auc": 0.790, "latency_us": 2.0}]
    >>> choose(rows, dense_auc=0.8, tolerance=0.001)["number"]
    1
    >>> SearchSpace(dnn=(0.9, 0.5)).validate()
    Traceback (most recent call last):
    ...
    deeplight.base.errors.DeeplightError: search range prune.dnn = 0.9:0.5 is empty (low > high)
"""

from deeplight.ops.sweep.measure import batch1_latency_us, compact_of, latency_ids, valid_view
from deeplight.ops.sweep.run import Sweep, base_config, brief, collect, finalize, open_sweep, prepare, run_sweep, trial_row, worker_id
from deeplight.ops.sweep.select import choose, pareto_front
from deeplight.ops.sweep.space import ATTR, DIRECTIONS, MODES, OBJECTIVES, SAMPLERS, SearchSpace, SweepSettings, parse_range
from deeplight.ops.sweep.storage import load_study, make_sampler, open_storage
from deeplight.ops.sweep.trial_log import TrialLogger
