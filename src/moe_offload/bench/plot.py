"""A report's decode tokens/s per configuration, beside the transfer-bound ceiling (PNG).

    plot_report(json.load(open("results.json")), "results.png")

One bar per measured entry (quantization, budget, routing, mode), the accelerate baseline
included; a tick over each bar marks the transfer-bound ceiling for the bytes that entry actually
moved per token (link peak measured in the same run / bytes per token). matplotlib is the
optional extra `bench`: `pip install -e ".[bench]"`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib (or the extra: pip install -e \".[bench]\"), "
                        "or plot later with `moe-offload bench plot --results JSON --out PNG`") from None


def entry_label(entry: dict) -> str:
    if entry.get("mode") == "accelerate":
        return f"accelerate bf16 @ {entry['budget']}"
    routing = entry.get("routing", "").split(" ")[0]
    return f"{entry['quant']} @ {entry['budget']}\n{entry['mode']}, {routing}"


def plot_report(report: dict, path) -> None:
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in report.get("results", []) if e.get("status") == "ok" and e.get("decode_tokens_per_s")]
    if not entries:
        raise UserError("the report has no measured entries to plot")
    colors = {"full": "tab:blue", "no-prefetch": "tab:orange", "no-cache": "tab:red", "accelerate": "tab:gray",
              "compute-only": "tab:green"}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(entries) + 2), 5.5))
    xs = range(len(entries))
    ax.bar(xs, [e["decode_tokens_per_s"] for e in entries], color=[colors.get(e["mode"], "tab:purple") for e in entries])
    for x, e in zip(xs, entries):
        ax.text(x, e["decode_tokens_per_s"], f"{e['decode_tokens_per_s']:.1f}", ha="center", va="bottom", fontsize=7)
        ceiling = e.get("transfer_ceiling_tokens_per_s")
        if ceiling:
            ax.plot([x - 0.4, x + 0.4], [ceiling, ceiling], color="black", linewidth=1.5)
    ax.plot([], [], color="black", label="transfer-bound ceiling (bytes moved per token / measured link peak)")
    for mode, color in colors.items():
        if any(e["mode"] == mode for e in entries):
            ax.bar([0], [0], color=color, label=mode)
    ax.set_xticks(list(xs), [entry_label(e) for e in entries], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("decode tokens/s (batch 1, median)")
    ceilings = [e.get("transfer_ceiling_tokens_per_s") or 0 for e in entries]
    top = max(max(e["decode_tokens_per_s"] for e in entries), *(c for c in ceilings if c < 10 * max(e["decode_tokens_per_s"] for e in entries)))
    ax.set_ylim(0, top * 1.15)
    ax.set_title(f"{report.get('card', '?')}, link peak {report.get('link_peak_gbps', 0):.0f} GB/s, {report.get('date', '')[:10]}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
