"""Plots a person would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def learning_curve(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Training loss and valid AUC per epoch, side by side."""
    path = Path(path)
    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss (running)")
    ax_loss.plot(epochs, [h["valid_logloss"] for h in history], marker="o", label="valid logloss")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    ax_auc.plot(epochs, [h["valid_auc"] for h in history], marker="o", color="tab:green")
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("valid AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
