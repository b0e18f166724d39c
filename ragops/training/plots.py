"""Loss curves as a picture: every `train/*` and `dev/*` series of a training history."""

from __future__ import annotations

from pathlib import Path


def plot_history(history: list[tuple[int, dict[str, float]]], png: str | Path, title: str) -> Path | None:
    """One panel per metric family (losses; KL/agreement-like train metrics; dev metrics), step on x.
    Returns the PNG path, or None when the history is empty."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = {}
    for step, metrics in history:
        for key, value in metrics.items():
            if key in ("train/lr", "train/index_version"):
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(step)
            ys.append(value)
    loss_keys = sorted(k for k in series if k.endswith("loss") or k.endswith("/kl"))
    other_keys = sorted(k for k in series if k not in loss_keys and not k.endswith("grad_norm"))
    panels = [keys for keys in (loss_keys, other_keys) if keys]
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, keys in zip(axes[0], panels, strict=True):
        for key in keys:
            xs, ys = series[key]
            style = {"marker": "o"} if key.startswith("dev/") or len(xs) < 20 else {}
            ax.plot(xs, ys, label=key, **style)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
