"""Reports -> docs/benchmarks.md's comparison with the paper's Table 2, as Markdown.

    print(table2_markdown([json.load(open("r.json"))], quant="4/2", budget="12GiB"))

Rows: the paper's ablation (full, no-prefetch, no-cache) and the accelerate baseline; columns:
the paper's A100 tokens/s and its ratio to accelerate, then ours per routing with the same ratio
(ours measured in one run on one card, so the ratios compare; the absolute numbers do not, PCIe
Gen4 there, Gen5 here). A cell with no measurement says so.
"""

from __future__ import annotations

PAPER_A100 = {"full": 3.06, "no-prefetch": 2.92, "no-cache": 2.27, "accelerate": 1.39}
ROW_NAMES = {"full": "full (LRU + prefetch)", "no-prefetch": "LRU, no prefetch", "no-cache": "no LRU, no prefetch",
             "accelerate": "transformers + accelerate (bf16)"}
NOT_MEASURED = "not measured"


def find(reports: list[dict], quant: str, budget: str, mode: str, routing: str | None) -> dict | None:
    for report in reports:
        for e in report.get("results", []):
            if e.get("status") != "ok" or e.get("mode") != mode or e.get("budget") != budget:
                continue
            if mode == "accelerate" or (e.get("quant") == quant and e.get("routing") == routing):
                return e
    return None


def table2_markdown(reports: list[dict], quant: str = "4/2", budget: str = "12GiB", routings=("own", "replay")) -> str:
    accelerate = find(reports, quant, budget, "accelerate", None)
    base = accelerate["decode_tokens_per_s"] if accelerate else None
    header = ["algorithm", "paper, A100 (tokens/s)", "paper ratio"]
    for routing in routings:
        header += [f"ours {quant} @ {budget}, {routing} routing (tokens/s)", "ratio", "hit rate", "link busy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode in ("full", "no-prefetch", "no-cache", "accelerate"):
        paper = PAPER_A100[mode]
        row = [ROW_NAMES[mode], f"{paper:.2f}", f"{paper / PAPER_A100['accelerate']:.2f}"]
        for routing in routings:
            e = accelerate if mode == "accelerate" else find(reports, quant, budget, mode, routing)
            if e is None:
                row += [NOT_MEASURED, "", "", ""]
                continue
            tps = e["decode_tokens_per_s"]
            note = " (extrapolated)" if e.get("decode_tokens_per_s_is") == "extrapolated" else ""
            row += [f"{tps:.2f}{note}", f"{tps / base:.2f}" if base else "",
                    f"{e['hit_rate']:.3f}" if e.get("hit_rate") is not None else "",
                    f"{e['link_busy']:.2f}" if e.get("link_busy") is not None else ""]
        lines.append("| " + " | ".join(row) + " |")
    cards = sorted({r.get("card", "?") for r in reports})
    lines.append("")
    peaks = ", ".join(f"{r.get('link_peak_gbps', 0):.1f}" for r in reports)
    commits = ", ".join(sorted({str(r.get("commit"))[:10] for r in reports}))
    lines.append(f"Card: {', '.join(cards)}; link peak {peaks} GB/s (pinned host->device, measured in the run); commit {commits}.")
    return "\n".join(lines)


def entries_markdown(reports: list[dict]) -> str:
    """Every entry of the reports, one row each (decode, prefill, cache, link, memory)."""
    header = ["quant", "budget", "routing", "mode", "status", "slots/layer", "decode tok/s", "ceiling tok/s", "hit rate",
              "recall", "link busy", "copy wait", "prefill tok/s", "TTFT s", "peak GiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def num(e, key, spec):
        value = e.get(key)
        return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""

    for report in reports:
        for e in report.get("results", []):
            lines.append("| " + " | ".join([
                str(e.get("quant", "bf16" if e.get("mode") == "accelerate" else "")), str(e.get("budget", "")),
                str(e.get("routing", "")).split(" ")[0], str(e.get("mode", "")), str(e.get("status", "")),
                str(e.get("slots_per_layer", "")), num(e, "decode_tokens_per_s", ".2f"),
                num(e, "transfer_ceiling_tokens_per_s", ".1f"), num(e, "hit_rate", ".3f"), num(e, "prefetch_recall", ".3f"),
                num(e, "link_busy", ".2f"), num(e, "copy_wait_share", ".2f"), num(e, "prefill_tokens_per_s", ".0f"),
                num(e, "time_to_first_token_s", ".2f"), num(e, "peak_gpu_gib", ".2f")]) + " |")
    return "\n".join(lines)
