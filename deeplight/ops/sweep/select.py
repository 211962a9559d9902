"""The Pareto front and the choice: the fastest trial within tolerance of dense."""

from __future__ import annotations

from typing import Any


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (auc, latency) points no other point beats on both (higher AUC, lower latency)."""
    front = []
    for i, (a, t) in enumerate(points):
        dominated = any((a2 >= a and t2 <= t) and (a2 > a or t2 < t) for j, (a2, t2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def choose(rows: list[dict[str, Any]], dense_auc: float, tolerance: float) -> dict[str, Any] | None:
    """The fastest COMPLETE trial whose valid AUC >= dense valid AUC - tolerance (ties: higher AUC)."""
    ok = [r for r in rows if r["state"] == "COMPLETE" and r["valid_auc"] >= dense_auc - tolerance]
    return min(ok, key=lambda r: (r["latency_us"], -r["valid_auc"], r["number"])) if ok else None
