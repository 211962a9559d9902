"""A sweep as a Markdown report with plots: the Pareto front, the paper's RQ1-RQ4 and the kept field pairs.

    from deeplight.evaluation.sweep_report import write_report
    files = write_report(summary, "out/sweep/report")   # summary: deeplight.ops.sweep.collect(study) (+ "final")
    files["report"]                                    # report.md next to its PNGs, pareto.html, trials.csv

    deeplight report --study NAME [--storage URL] --out DIR     (or --summary out/sweep/report/summary.json)

Files: `pareto.png` and `pareto.html` (valid AUC against batch-1 latency, every COMPLETE trial, the front, the
dense baseline and the chosen trial; the HTML is interactive and self-contained), `sparsity.png` (valid AUC and
latency against the achieved sparsity of the DNN, the field pairs and the embeddings: RQ1-RQ3), `pairs.png`
(|r_ij| of the chosen model's kept field pairs), `trials.csv`, `summary.json` and `report.md`.
The report states the dense baseline, the data and the machine. A sweep varies all three components at once,
so the RQ1-RQ3 plots show each component's marginal effect, not an isolated one as in the paper.

Plain functions of the summary dict: no Optuna or MLflow here (matplotlib; plotly for the HTML).

    >>> fmt_us(12.345), fmt_pct(0.9012), fmt_auc(0.81234567)
    ('12.3', '90.1%', '0.81235')
"""

from __future__ import annotations

import csv
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from deeplight.base.config import SweepConfig
from deeplight.base.files import write_json

COMPONENTS = (("dnn", "DNN"), ("field", "field pairs"), ("embedding", "embeddings"))
MODE_STYLE = {"unstructured": ("o", "#1f77b4"), "structured": ("s", "#ff7f0e")}  # hex: matplotlib and plotly


def fmt_us(x: Any) -> str:
    return "-" if x is None else f"{x:.1f}"


def fmt_pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def fmt_auc(x: Any) -> str:
    return "-" if x is None else f"{x:.5f}"


def machine_info() -> dict[str, Any]:
    """Where trials ran: CPU model, cores usable, memory, OS and the numeric libraries' versions."""
    import numba
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "memory_gb": mem_gb, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "numba": numba.__version__}


# --- the summary, in rows ------------------------------------------------------------------------------------

def complete_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in summary["trials"] if r["state"] == "COMPLETE"]


def chosen_row(summary: dict[str, Any]) -> dict[str, Any] | None:
    number = summary.get("chosen", (summary.get("final") or {}).get("chosen"))
    return next((r for r in summary["trials"] if r["number"] == number), None) if number is not None else None


def dense_latency(summary: dict[str, Any]) -> float | None:
    return (summary.get("final") or {}).get("dense_latency_us")


def _mode(r: dict[str, Any]) -> str:
    return r.get("params", {}).get("prune.mode", "unstructured")


# --- plots ---------------------------------------------------------------------------------------------------

def pareto_png(summary: dict[str, Any], path: str | Path) -> Path:
    """Valid AUC against batch-1 latency: every trial, the Pareto front, the dense baseline, the choice."""
    from deeplight.base.plots import plt

    rows, dense = complete_rows(summary), summary["dense"]["valid"]["auc"]
    front = sorted((r for r in rows if r["number"] in set(summary["pareto"])), key=lambda r: r["latency_us"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, (marker, color) in MODE_STYLE.items():
        pts = [r for r in rows if _mode(r) == mode]
        if pts:
            ax.scatter([r["latency_us"] for r in pts], [r["valid_auc"] for r in pts], marker=marker, color=color,
                       alpha=0.6, label=f"{mode} ({len(pts)})")
    if front:
        ax.plot([r["latency_us"] for r in front], [r["valid_auc"] for r in front], color="black", lw=1,
                drawstyle="steps-post", label="Pareto front")
    tol = summary.get("tolerance") or (summary.get("final") or {}).get("tolerance") or 0.0
    ax.axhline(dense, color="tab:green", ls="--", lw=1, label=f"dense valid AUC {dense:.4f}")
    if tol:
        ax.axhspan(dense - tol, dense, color="tab:green", alpha=0.08, label=f"tolerance {tol:g}")
    if dense_latency(summary):
        ax.axvline(dense_latency(summary), color="tab:green", ls=":", lw=1, label="dense latency")
    chosen = chosen_row(summary)
    if chosen:
        ax.scatter([chosen["latency_us"]], [chosen["valid_auc"]], marker="*", s=250, color="tab:red", zorder=5,
                   label=f"chosen: trial {chosen['number']}")
    ax.set(xlabel="batch-1 latency of the compact model (us, median)", ylabel="valid AUC",
           title=f"sweep {summary['study']}: {len(rows)} trials")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path, plt)


def pareto_html(summary: dict[str, Any], path: str | Path) -> Path:
    """The Pareto plot as interactive, self-contained HTML (hover: a trial's settings and sparsity)."""
    import plotly.graph_objects as go

    rows, dense = complete_rows(summary), summary["dense"]["valid"]["auc"]
    fig = go.Figure()
    for mode, (marker, color) in MODE_STYLE.items():
        pts = [r for r in rows if _mode(r) == mode]
        if not pts:
            continue
        fig.add_trace(go.Scatter(
            x=[r["latency_us"] for r in pts], y=[r["valid_auc"] for r in pts], mode="markers", name=mode,
            marker={"symbol": "circle" if marker == "o" else "square", "color": color, "size": 9},
            text=[_hover(r) for r in pts], hovertemplate="%{text}<extra></extra>"))
    front = sorted((r for r in rows if r["number"] in set(summary["pareto"])), key=lambda r: r["latency_us"])
    if front:
        fig.add_trace(go.Scatter(x=[r["latency_us"] for r in front], y=[r["valid_auc"] for r in front],
                                 mode="lines", line={"shape": "hv", "color": "black"}, name="Pareto front",
                                 hoverinfo="skip"))
    chosen = chosen_row(summary)
    if chosen:
        fig.add_trace(go.Scatter(x=[chosen["latency_us"]], y=[chosen["valid_auc"]], mode="markers",
                                 name=f"chosen (trial {chosen['number']})",
                                 marker={"symbol": "star", "size": 18, "color": "red"}, text=[_hover(chosen)],
                                 hovertemplate="%{text}<extra></extra>"))
    fig.add_hline(y=dense, line_dash="dash", line_color="green", annotation_text=f"dense {dense:.4f}")
    fig.update_layout(title=f"sweep {summary['study']}: valid AUC vs batch-1 latency",
                      xaxis_title="batch-1 latency (us, median)", yaxis_title="valid AUC", template="plotly_white")
    path = Path(path)
    fig.write_html(path, include_plotlyjs=True, full_html=True)  # self-contained: opens offline, in MLflow too
    return path


def _hover(r: dict[str, Any]) -> str:
    p, s = r.get("params", {}), r.get("sparsity", {})
    return (f"trial {r['number']} ({p.get('prune.mode', '?')}, fine-tune {p.get('prune.finetune_epochs', '?')})<br>"
            f"AUC {r['valid_auc']:.5f}, {r['latency_us']:.1f} us<br>"
            f"targets dnn {p.get('prune.dnn', 0):.2f} field {p.get('prune.field', 0):.2f} "
            f"emb {p.get('prune.embedding', 0):.2f}<br>"
            f"achieved dnn {fmt_pct(s.get('dnn'))} field {fmt_pct(s.get('field'))} emb {fmt_pct(s.get('embedding'))}")


def sparsity_png(summary: dict[str, Any], path: str | Path) -> Path:
    """RQ1-RQ3: valid AUC (top) and latency (bottom) against each component's achieved sparsity."""
    from deeplight.base.plots import plt

    rows, dense = complete_rows(summary), summary["dense"]["valid"]["auc"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharey="row", squeeze=False)
    for col, (key, label) in enumerate(COMPONENTS):
        for mode, (marker, color) in MODE_STYLE.items():
            pts = [r for r in rows if _mode(r) == mode and key in r.get("sparsity", {})]
            x = [r["sparsity"][key] for r in pts]
            axes[0][col].scatter(x, [r["valid_auc"] for r in pts], marker=marker, color=color, alpha=0.6,
                                 label=mode)
            axes[1][col].scatter(x, [r["latency_us"] for r in pts], marker=marker, color=color, alpha=0.6)
        axes[0][col].axhline(dense, color="tab:green", ls="--", lw=1, label="dense")
        if dense_latency(summary):
            axes[1][col].axhline(dense_latency(summary), color="tab:green", ls="--", lw=1)
        axes[0][col].set_title(f"RQ{col + 1}: {label}")
        axes[1][col].set_xlabel(f"achieved {label} sparsity")
    axes[0][0].set_ylabel("valid AUC")
    axes[1][0].set_ylabel("batch-1 latency (us)")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path, plt)


def pairs_trial(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The trial whose field pairs the report draws: the chosen one, else the most accurate."""
    return chosen_row(summary) or max(complete_rows(summary), key=lambda r: r["valid_auc"], default=None)


def pairs_png(summary: dict[str, Any], path: str | Path) -> Path | None:
    """|r_ij| of the chosen (else the most accurate) trial's kept field pairs, blank where pruned; None when the
    model has no field pairs."""
    from deeplight.base.plots import plt

    chosen, fields = pairs_trial(summary), (summary.get("data") or {}).get("fields") or []
    if chosen is None or not fields or not chosen.get("kept_pairs"):
        return None
    F = len(fields)
    R = np.full((F, F), np.nan)
    for i, j, r in chosen["kept_pairs"]:
        R[i, j] = R[j, i] = abs(r)
    fig, ax = plt.subplots(figsize=(min(4 + 0.22 * F, 12), min(3.5 + 0.22 * F, 11)))
    im = ax.imshow(R, cmap="viridis")  # colour range of the kept pairs: their differences, not their distance to 0
    ax.set_title(f"trial {chosen['number']}: |r_ij|, {len(chosen['kept_pairs'])} of {F * (F - 1) // 2} pairs kept")
    ax.set_xticks(range(F), fields, rotation=90, fontsize=6)
    ax.set_yticks(range(F), fields, fontsize=6)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path, plt)


def _save(fig: Any, path: str | Path, plt: Any) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- tables and text -------------------------------------------------------------------------------------------

TRIAL_COLUMNS = ("trial", "mode", "finetune", "dnn", "field", "embedding", "valid_auc", "latency_us", "nonzero",
                 "kept_pairs", "pareto", "chosen")


def trial_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per COMPLETE trial, fastest first: targets -> achieved sparsity, both objectives, flags."""
    chosen, front = chosen_row(summary), set(summary["pareto"])
    out = []
    for r in sorted(complete_rows(summary), key=lambda r: (r["latency_us"], -r["valid_auc"])):
        p, s = r.get("params", {}), r.get("sparsity", {})
        out.append({"trial": r["number"], "mode": p.get("prune.mode"), "finetune": p.get("prune.finetune_epochs"),
                    **{c: f"{p.get(f'prune.{c}', 0):.2f} -> {fmt_pct(s.get(c))}" for c, _ in COMPONENTS},
                    "valid_auc": fmt_auc(r["valid_auc"]), "latency_us": fmt_us(r["latency_us"]),
                    "nonzero": r.get("nonzero"), "kept_pairs": len(r.get("kept_pairs", [])),
                    "pareto": "yes" if r["number"] in front else "",
                    "chosen": "**chosen**" if chosen and chosen["number"] == r["number"] else ""})
    return out


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(summary: dict[str, Any], files: dict[str, Path]) -> str:
    dense, final, data = summary["dense"], summary.get("final") or {}, summary.get("data") or {}
    machine, chosen = summary.get("machine") or {}, chosen_row(summary)
    rows = complete_rows(summary)
    tol = final.get("tolerance", summary.get("tolerance", SweepConfig().tolerance))
    space = summary.get("space") or {}
    out = [f"# Sparsity sweep `{summary['study']}`", ""]
    out += ["Trials: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(summary["states"].items())) + "; "
            f"sampler {summary.get('sampler')}, seed {summary.get('seed')}; objectives: maximize valid AUC, minimize "
            "the median batch-1 latency of the compact model (one thread, real test ids).", ""]
    order = [k for k in ("dnn", "field", "embedding", "modes", "finetune_epochs") if k in space]
    out += ["Search space: " + ", ".join(f"`{k}` {(',' if k == 'modes' else ':').join(map(str, space[k]))}"
                                         for k in order) + ".", ""]

    out += ["## Data", ""]
    split_rows = data.get("rows", {})
    out += [f"- dataset `{data.get('dataset', '?')}`, {len(data.get('fields', []))} fields; rows: "
            + ", ".join(f"{k} {split_rows[k]:,}" for k in ("train", "valid", "test") if k in split_rows),
            f"- fingerprints: train `{str(data.get('train', ''))[:16]}`, valid `{str(data.get('valid', ''))[:16]}`, "
            f"feature map `{str(data.get('feature_map', ''))[:16]}`", ""]
    out += ["## Machine", ""]
    out += [f"- {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores usable, "
            f"{machine.get('memory_gb', '?')} GB; {machine.get('os', '?')}",
            f"- Python {machine.get('python', '?')}, torch {machine.get('torch', '?')}, numpy "
            f"{machine.get('numpy', '?')}, numba {machine.get('numba', '?')}",
            "- latency: median of per-call `score_one` times; trials were timed in their own worker process while "
            "other work shared the machine, dense and chosen side by side at the end.", ""]

    out += ["## Dense baseline", ""]
    cfg = summary.get("config") or {}
    out += [f"- {cfg.get('model.kind', 'deepfwfm')}, embeddings {cfg.get('model.embed_dim', '?')}, DNN "
            f"{cfg.get('model.dnn', '?')}, {dense.get('params', 0):,} parameters; epochs: "
            f"{cfg.get('train.epochs', '?')} (batch {cfg.get('train.batch_size', '?')}), best epoch {dense.get('epoch')}",
            f"- valid AUC {fmt_auc(dense['valid']['auc'])}, valid logloss "
            f"{dense['valid'].get('logloss', float('nan')):.5f}"
            + (f"; test AUC {fmt_auc(final['dense_test'].get('auc'))}" if final.get("dense_test") else ""),
            f"- batch-1 latency {fmt_us(final.get('dense_latency_us'))} us", ""]

    out += ["## Pareto front", "", f"![Pareto front]({files['pareto_png'].name}) "
            f"(interactive: [{files['pareto_html'].name}]({files['pareto_html'].name}))", ""]
    front = [r for r in sorted(rows, key=lambda r: r["latency_us"]) if r["number"] in set(summary["pareto"])]
    out += [markdown_table([t for t in trial_table(summary) if t["trial"] in {r["number"] for r in front}],
                           TRIAL_COLUMNS[:-2]), ""]

    out += ["## RQ1-RQ3: accuracy and latency against each component's sparsity", "",
            f"![sparsity]({files['sparsity_png'].name})", "",
            "Every point is a trial; all three components vary together, so each panel shows one component's "
            "marginal effect.", ""]

    out += ["## RQ4: combined speedup at no AUC loss", ""]
    if chosen is None:
        out += [f"No trial reached a valid AUC within {tol:g} of the dense model "
                f"({fmt_auc(dense['valid']['auc'])}); best trial valid AUC "
                f"{fmt_auc(max((r['valid_auc'] for r in rows), default=None))}.", ""]
    else:
        p, s = chosen.get("params", {}), chosen.get("sparsity", {})
        test = final.get("chosen_test") or {}
        out += [f"Chosen: trial {chosen['number']}, the fastest whose valid AUC is within {tol:g} of dense "
                f"({p.get('prune.mode')}, fine-tune epochs: {p.get('prune.finetune_epochs')}).", ""]
        table = [
            {"": "valid AUC", "dense": fmt_auc(dense["valid"]["auc"]), "chosen": fmt_auc(chosen["valid_auc"])},
            {"": "test AUC (scored once, after the choice)",
             "dense": fmt_auc((final.get("dense_test") or {}).get("auc")), "chosen": fmt_auc(test.get("auc"))},
            {"": "batch-1 latency (us, side by side)", "dense": fmt_us(final.get("dense_latency_us")),
             "chosen": fmt_us(final.get("chosen_latency_us"))},
            {"": "speedup", "dense": "1.0x", "chosen": f"{final['speedup']:.2f}x" if final.get("speedup") else "-"},
            {"": "nonzero parameters", "dense": f"{dense.get('params', 0):,}",
             "chosen": f"{chosen.get('nonzero', 0):,}"},
            *({"": f"{label} sparsity", "dense": "0%", "chosen": fmt_pct(s.get(key))} for key, label in COMPONENTS),
            {"": "field pairs kept", "dense": "all", "chosen": str(len(chosen.get("kept_pairs", [])))},
        ]
        out += [markdown_table(table, ("", "dense", "chosen")), ""]
        if final.get("registered"):
            reg = final["registered"]
            out += [f"Registered: `{reg.get('name', '?')}` version {reg.get('version', '?')}.", ""]
    if "pairs_png" in files:
        shown = pairs_trial(summary) or {}
        which = "the chosen" if chosen else "the most accurate"
        out += ["## Kept field pairs", "", f"![field pairs]({files['pairs_png'].name})", "",
                f"Field pairs of {which} trial ({shown.get('number')}), strongest first: "
                + ", ".join(shown.get("top_pairs", [])[:10]) + ".", ""]
    out += ["## All trials", "", f"Fastest first; `target -> achieved` sparsity. Also in `{files['trials_csv'].name}`.",
            "", markdown_table(trial_table(summary), TRIAL_COLUMNS), ""]
    failed = [r for r in summary["trials"] if r["state"] != "COMPLETE"]
    if failed:
        out += [f"Not complete: " + ", ".join(f"trial {r['number']} {r['state'].lower()}"
                                               + (" (surplus)" if r.get("surplus") else "") for r in failed) + ".", ""]
    if summary.get("mlflow_parent_run_id"):
        out += [f"MLflow: experiment `{summary.get('experiment')}`, sweep run `{summary['mlflow_parent_run_id']}` "
                "(one child run per trial).", ""]
    return "\n".join(out)


def write_report(summary: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """All report files into out_dir; returns name -> path (`report`, `pareto_png`, `pareto_html`, ...)."""
    from deeplight.base.errors import DeeplightError

    if not summary.get("dense"):
        raise DeeplightError(f"sweep {summary.get('study')!r} has no dense baseline yet: nothing to report")
    if not complete_rows(summary):
        raise DeeplightError(f"sweep {summary.get('study')!r} has no complete trial yet: nothing to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"pareto_png": pareto_png(summary, out / "pareto.png"),
                              "pareto_html": pareto_html(summary, out / "pareto.html"),
                              "sparsity_png": sparsity_png(summary, out / "sparsity.png")}
    pairs = pairs_png(summary, out / "pairs.png")
    if pairs is not None:
        files["pairs_png"] = pairs
    files["trials_csv"] = _write_csv(summary, out / "trials.csv")
    files["summary"] = out / "summary.json"
    write_json(files["summary"], summary)
    files["report"] = out / "report.md"
    files["report"].write_text(render_markdown(summary, files))
    return files


def _write_csv(summary: dict[str, Any], path: Path) -> Path:
    cols = ["number", "state", "prune.mode", "prune.finetune_epochs", "prune.dnn", "prune.field", "prune.embedding",
            "sparsity.dnn", "sparsity.field", "sparsity.embedding", "valid_auc", "valid_logloss", "latency_us",
            "nonzero", "kept_pairs", "pareto", "duration_s", "worker", "mlflow_run_id"]
    front = set(summary["pareto"])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in summary["trials"]:
            w.writerow({"number": r["number"], "state": r["state"],
                         **{k: v for k, v in r.get("params", {}).items() if k in cols},
                         **{f"sparsity.{k}": v for k, v in r.get("sparsity", {}).items() if f"sparsity.{k}" in cols},
                         "valid_auc": r.get("valid_auc"), "valid_logloss": r.get("valid_logloss"),
                         "latency_us": r.get("latency_us"), "nonzero": r.get("nonzero"),
                         "kept_pairs": len(r.get("kept_pairs", [])), "pareto": r["number"] in front,
                         "duration_s": r.get("duration_s"), "worker": r.get("worker"),
                         "mlflow_run_id": r.get("mlflow_run_id")})
    return path


def load_summary(path: str | Path) -> dict[str, Any]:
    from deeplight.base.files import read_json

    summary = read_json(path)
    if not isinstance(summary, dict) or "trials" not in summary:
        from deeplight.base.errors import DeeplightError

        raise DeeplightError(f"{path}: not a sweep summary (written by `deeplight sweep` as report/summary.json)")
    return summary
