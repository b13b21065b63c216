"""`--plot out.png`: latency percentiles and goodput of each run (against rate for a sweep)."""

from __future__ import annotations

from pathlib import Path


def plot(runs: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    labels = [str(run["label"]) for run in runs]
    x = list(range(len(runs)))
    figure, (latency, goodput) = plt.subplots(1, 2, figsize=(11, 4))
    for metric, style in (("ttft_s", "o-"), ("tpot_s", "s--"), ("e2e_s", "^:")):
        for quantile, alpha in (("p50", 1.0), ("p99", 0.5)):
            latency.plot(x, [run[metric][quantile] * 1e3 for run in runs], style, alpha=alpha,  # type: ignore[index]
                         label=f"{metric[:-2].upper()} {quantile}")
    latency.set_yscale("log")
    latency.set_ylabel("ms")
    latency.set_title("latency percentiles")
    goodput.plot(x, [run["goodput"] for run in runs], "o-", label="goodput (met both SLOs)")
    goodput.plot(x, [run["request_throughput"] for run in runs], "s--", label="throughput")
    goodput.set_ylabel("requests/s")
    goodput.set_title("goodput")
    for axis in (latency, goodput):
        axis.set_xticks(x, labels, rotation=20)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
