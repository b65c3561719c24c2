"""The sweep's two figures (matplotlib, Agg): accuracy against K per method, and accuracy against mean TTFT."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from prunert.errors import ConfigError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("prunert sweep: the plots need matplotlib; pip install 'prunert[export]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_k(results: Sequence[Any], path: Path, title: str = "") -> Path:
    """One line per series (method or parameter variant) over K; the unpruned accuracy (results[0]) dashed."""
    plt = _pyplot()
    base = results[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results[1:]:
        series.setdefault(r.point.line, []).append((r.point.budget.budget, 100 * r.result.accuracy))
    for line, points in series.items():
        ks, acc = zip(*sorted(points))
        ax.plot(ks, acc, marker="o", label=line)
    ax.axhline(100 * base.result.accuracy, color="black", linestyle="--", linewidth=1,
               label=f"unpruned (K={base.point.budget.budget})")
    budgets = sorted({r.point.budget.budget for r in results[1:]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(k) for k in budgets])
    return _finish(plt, fig, ax, path, "K kept visual tokens", title or f"accuracy vs K ({len(base.result.predictions)} questions)")


def plot_accuracy_vs_ttft(results: Sequence[Any], path: Path) -> Path:
    """Every point's accuracy against its mean TTFT (ms), one line per series (the colours of accuracy-vs-K);
    the unpruned baseline (results[0]) a black star."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    base = results[0]
    ax.plot([1e3 * base.result.ttft_s], [100 * base.result.accuracy], marker="*", markersize=10, color="black",
            linestyle="none", label=f"unpruned (K={base.point.budget.budget})")
    series: dict[str, list[tuple[float, float, int]]] = {}
    for r in results[1:]:
        series.setdefault(r.point.line, []).append((1e3 * r.result.ttft_s, 100 * r.result.accuracy, r.point.budget.budget))
    for line, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=line)
        for ttft, acc, k in points:
            ax.annotate(str(k), (ttft, acc), fontsize=6, xytext=(2, 2), textcoords="offset points")
    return _finish(plt, fig, ax, path, "mean TTFT (ms, this machine; labels: K)", "accuracy vs time to first token")


def _finish(plt: Any, fig: Any, ax: Any, path: Path, xlabel: str, title: str) -> Path:
    """Labels, grid and legend of either figure; written to `path` as PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
