"""Plots and tables: curves.png of one run, comparison.png and a markdown table of several.

A history is the list of per-epoch records a run writes to metrics.jsonl
(keys ``epoch``, ``train_loss``, ``train_accuracy``, ``val_loss``,
``val_accuracy``, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker

PANELS = (
    ("train_loss", "training loss"),
    ("val_loss", "validation loss"),
    ("train_accuracy", "training accuracy"),
    ("val_accuracy", "validation accuracy"),
)

# Columns of the comparison table: (metrics key, header, format).
TABLE_COLUMNS = (
    ("test_accuracy", "test acc", "{:.2%}"),
    ("test_loss", "test loss", "{:.4f}"),
    ("val_accuracy", "val acc", "{:.2%}"),
    ("train_accuracy", "train acc", "{:.2%}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("epochs", "epochs", "{:d}"),
    ("train_time_s", "train time", "{:.1f} s"),
)


def read_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads the per-epoch records of a metrics.jsonl file, in epoch order (skips the final record).

    A last line cut short (a run killed while writing it) is ignored; an epoch
    recorded twice keeps its later record.

    Raises:
      ValueError: for a line before the last that is not JSON.
    """
    lines = Path(path).read_text().splitlines()
    by_epoch: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{os.fspath(path)}, line {i + 1}: not a JSON record") from None
        if not record.get("final", False):
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def _panel(ax: Any, histories: Mapping[str, Sequence[Mapping[str, Any]]], key: str, title: str) -> None:
    for name, history in histories.items():
        points = [(r["epoch"], r[key]) for r in history if key in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if "accuracy" in key:
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(xmax=1.0, decimals=1))


def plot_histories(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike[str],
    title: str = "",
) -> str:
    """Plots training/validation loss and accuracy per epoch, one line per history.

    Args:
      histories: run name -> per-epoch records.
      path: the PNG file to write (its directory is created).
      title: figure title.

    Returns:
      The path written.
    """
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, label) in zip(axes.flat, PANELS):
        _panel(ax, histories, key, label)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str = "") -> str:
    """Writes curves.png of one run (see plot_histories)."""
    return plot_histories({title or "run": history}, path, title)


def markdown_table(
    results: Mapping[str, Mapping[str, Any]],
    published: Mapping[str, float] | None = None,
) -> str:
    """A markdown table of final metrics, one row per run.

    Args:
      results: run name -> final metrics (as returned by train_and_evaluate).
      published: optional run name -> published test accuracy (a fraction).

    Returns:
      The table, ending with a newline.
    """
    headers = ["run"] + [h for _, h, _ in TABLE_COLUMNS]
    if published:
        headers.append("published test acc")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, metrics in results.items():
        cells = [name]
        for key, _, fmt in TABLE_COLUMNS:
            value = metrics.get(key)
            cells.append("" if value is None else fmt.format(value))
        if published:
            ref = published.get(name)
            cells.append("" if ref is None else f"{ref:.2%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
