"""The memory profiler's PNGs (matplotlib, an optional extra: ``llmwire[plot]``).

Both figures have three panels: the sender, the receiver, and both processes
together (the paper's figures measure the whole machine). :func:`timelines`
draws RSS over time for every run; :func:`sweep` draws peak memory over
baseline against model size for every mode.
"""

from __future__ import annotations

from typing import Any, Iterable

__all__ = ["PlotUnavailable", "require", "timelines", "sweep", "combined"]

GIB = float(1 << 30)
PANELS = (("sender", "sender"), ("receiver", "receiver"),
          ("total", "sender + receiver"))


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require() -> Any:
    """matplotlib.pyplot on the Agg backend, or :class:`PlotUnavailable`."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("plotting needs matplotlib: pip install 'llmwire[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def combined(timelines: dict[str, list[tuple[float, int, int]]]
             ) -> list[tuple[float, int, int]]:
    """Sender + receiver at the moments both were sampled (same sampler pass)."""
    receiver = {t: (rss, anon) for t, rss, anon in timelines["receiver"]}
    return [(t, rss + receiver[t][0], anon + receiver[t][1])
            for t, rss, anon in timelines["sender"] if t in receiver]


def _figure(plt: Any, title: str) -> tuple[Any, Any]:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    fig.suptitle(title)
    return fig, axes


def _finish(plt: Any, fig: Any, axes: Iterable[Any], path: str) -> None:
    handles, labels = next(iter(axes)).get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize="small")
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def timelines(runs: dict[str, Any], title: str, path: str) -> None:
    """RSS (GiB) against seconds since the transfer started, one line per run,
    from before the model is built until the receiver has everything (a dot;
    the receiver's verification afterwards is left out of the picture).

    ``runs`` maps a label to figures holding ``timelines`` (process → samples)
    and ``events`` (``go``, ``received``).
    """
    plt = require()
    fig, axes = _figure(plt, title)
    for i, (label, r) in enumerate(runs.items()):
        go, done = r["events"]["go"], r["events"]["received"]
        series = {**r["timelines"], "total": combined(r["timelines"])}
        for ax, (process, _) in zip(axes, PANELS):
            samples = [s for s in series[process] if s[0] <= done]
            ax.plot([t - go for t, _, _ in samples], [rss / GIB for _, rss, _ in samples],
                    color=f"C{i % 10}", linewidth=1.2, label=label)
            if samples:
                ax.plot([done - go], [samples[-1][1] / GIB], "o", color=f"C{i % 10}",
                        markersize=4)
    for ax, (_, name) in zip(axes, PANELS):
        ax.axvline(0.0, color="grey", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("seconds since the transfer started")
        ax.set_ylabel("RSS (GiB)")
        ax.grid(alpha=0.3)
    _finish(plt, fig, axes, path)


def sweep(points: list[dict[str, Any]], title: str, path: str) -> None:
    """Peak minus baseline (GiB) against model size, one line per mode.

    ``points`` is a list of ``{"model_bytes", "modes": {label: figures}}``
    where figures hold ``sender_peak_mib``, ``receiver_peak_mib`` and
    ``total_peak_mib``.
    """
    plt = require()
    fig, axes = _figure(plt, title)
    sizes = [p["model_bytes"] / GIB for p in points]
    labels = list(dict.fromkeys(label for p in points for label in p["modes"]))
    for ax, (process, name) in zip(axes, PANELS):
        ax.plot(sizes, sizes, ":", color="grey", label="one copy of the model")
        for i, label in enumerate(labels):
            xs = [p["model_bytes"] / GIB for p in points if label in p["modes"]]
            ys = [p["modes"][label][f"{process}_peak_mib"] / 1024 for p in points
                  if label in p["modes"]]
            # distinct markers, the first lines drawn largest: equal figures stay visible
            ax.plot(xs, ys, "-", marker="osD^v<>p"[i % 8], markersize=max(3, 9 - 2 * i),
                    color=f"C{i % 10}", label=label)
        ax.set_title(name)
        ax.set_xlabel("model size (GiB)")
        ax.set_ylabel("peak over baseline (GiB)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _finish(plt, fig, axes, path)
