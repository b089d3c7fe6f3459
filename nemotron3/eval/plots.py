"""Writing an evaluation's JSON and its PNG (same stem). matplotlib is optional: without it the PNG is
skipped with a printed note."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_result(result: dict[str, Any], out: str | Path) -> tuple[Path, Path | None]:
    """Write `result` to `out` (JSON) and its plot next to it (`out` with .png); returns both paths
    (PNG None when matplotlib is missing)."""
    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"--out must name a .json file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    png = out.with_suffix(".png")
    return out, png if plot(result, png) else None


def plot(result: dict[str, Any], path: Path) -> bool:
    """Draw the PNG matching result["eval"]; False (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; skipped {path}")
        return False
    draw: dict[str, Callable] = {"tasks": _tasks, "budget": _budget, "ruler": _ruler, "perplexity": _perplexity}
    fig = draw[result["eval"]](plt, result)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _tasks(plt, r: dict[str, Any]):
    """Grouped bars: domains (+ average) on x, one bar per (model, thinking mode), error bars = std over seeds."""
    groups = [*r["domains"], "average"]
    series = [(f"{label}" + (f" (thinking {mode})" if len(m["modes"]) > 1 or r["thinking"] == "off" else ""), mr)
              for label, m in r["models"].items() for mode, mr in m["modes"].items()]  # fmt: skip
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 0.35 * len(groups) * max(1, len(series)) + 2)), 4.2))
    width = 0.8 / max(1, len(series))
    for i, (name, mr) in enumerate(series):
        rows = [mr["domains"][d] for d in r["domains"]] + [mr["average"]]
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [x["accuracy_mean"] for x in rows], width, yerr=[x["accuracy_std"] for x in rows],
               capsize=3, label=name)  # fmt: skip
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("greedy exact-match accuracy")
    ax.set_title(f"task accuracy, mean ± std over {len(r['seeds'])} seed(s)")
    ax.legend(fontsize=8)
    return fig


def _budget(plt, r: dict[str, Any]):
    """Accuracy (y) vs mean reasoning tokens (x): one line per model, each point labelled with its budget."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, m in r["models"].items():
        pts = sorted(m["points"], key=lambda p: p["mean_reasoning_tokens"])
        xs, ys = [p["mean_reasoning_tokens"] for p in pts], [p["accuracy_mean"] for p in pts]
        ax.errorbar(xs, ys, yerr=[p["accuracy_std"] for p in pts], marker="o", capsize=3, label=label)
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(p["budget"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("mean reasoning tokens")
    ax.set_ylabel("greedy exact-match accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{r['domain']}: accuracy vs thinking budget (n={r['n']} x {len(r['seeds'])} seeds)")
    ax.legend(fontsize=8)
    return fig


def _ruler(plt, r: dict[str, Any]):
    """Heatmap: needle depth rows x context length columns, each cell annotated with its accuracy."""
    grid = [[float("nan") if v is None else v for v in row] for row in r["accuracy_grid"]]
    fig, ax = plt.subplots(figsize=(1.2 * max(1, len(r["lengths"])) + 2, 0.6 * len(r["depths"]) + 1.8))
    ax.imshow(grid if r["lengths"] else [[float("nan")]], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i, row in enumerate(r["accuracy_grid"]):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(r["lengths"])))
    ax.set_xticklabels([str(x) for x in r["lengths"]])
    ax.set_yticks(range(len(r["depths"])))
    ax.set_yticklabels([f"{d:g}" for d in r["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{r['label']}: key-value retrieval accuracy (thinking {'on' if r['thinking'] else 'off'})")
    return fig


def _perplexity(plt, r: dict[str, Any]):
    """One bar per model: held-out perplexity, annotated with the loss."""
    labels = list(r["models"])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(labels) + 2), 3.5))
    ppl = [r["models"][x]["perplexity"] for x in labels]
    ax.bar(range(len(labels)), ppl)
    for i, x in enumerate(labels):
        ax.text(i, ppl[i], f"loss {r['models'][x]['loss']:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{r['sequences']} x {r['seq_len']}-token sequences")
    return fig
