"""PNG plots of the bench's tables (matplotlib, headless)."""
import math
import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bytes_plot(rows, path):
    """Bars per loss: fastkd's [N, V] stream bytes, DESIGN.md's floor and the eager reference's, bf16."""
    plt = _pyplot()
    rows = [r for r in rows if r["dtype"] == "bfloat16" and "eager_bytes_per_elem" in r]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [r["loss"] for r in rows]
    width = 0.27
    for k, (key, label) in enumerate([("fused_stream_bytes_per_elem", "fastkd (counted)"),
                                      ("model_bytes_per_elem", "floor (DESIGN.md)"),
                                      ("eager_bytes_per_elem", "eager reference (counted)")]):
        ax.bar([i + (k - 1) * width for i in range(len(rows))], [r[key] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), names)
    ax.set_yscale("log")
    ax.set_ylabel("bytes moved per logit element / element size")
    ax.set_title("Forward + backward memory traffic, bf16 (Triton interpreter count)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timing_plot(rows, path, mode="forward+backward"):
    """Per loss: time and % of copy bandwidth against the vocabulary size, one line per implementation."""
    plt = _pyplot()
    rows = [r for r in rows if r["mode"] == mode and not math.isnan(r["ms"])]
    losses = sorted({r["loss"] for r in rows})
    fig, axes = plt.subplots(len(losses), 2, figsize=(11, 3.2 * len(losses)), squeeze=False)
    for (time_ax, pct_ax), name in zip(axes, losses):
        for impl in sorted({r["impl"] for r in rows if r["loss"] == name}):
            pts = sorted((r["V"], r["ms"], r["pct_of_copy"]) for r in rows if r["loss"] == name and r["impl"] == impl)
            time_ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            pct_ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=impl)
        time_ax.set(xscale="log", yscale="log", xlabel="vocabulary V", ylabel="ms", title=f"{name}: time ({mode})")
        pct_ax.set(xscale="log", xlabel="vocabulary V", ylabel="% of copy bandwidth", title=f"{name}: bandwidth")
        time_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def try_plot(plot, rows, out, name):
    """Write out/name with `plot`, or say why not (matplotlib missing)."""
    path = os.path.join(out, name)
    try:
        plot(rows, path)
    except ImportError as e:
        return f"no plot ({e}): pip install matplotlib"
    return f"wrote {path}"
