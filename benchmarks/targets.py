"""The issue's speed targets, checked against the rows of one benchmark run.

Each check reports the measured figure next to its target and says whether it is met; a
target whose case was not in the run is reported as not measured. Targets are benchmark
figures, never test assertions.
"""


def _find(rows, op, *shape_parts):
    return [r for r in rows if r["op"] == op and all(p in r["shape"] for p in shape_parts)]


def _line(name, measured, target, ok):
    verdict = "met" if ok else "**not met**"
    return f"| {name} | {measured} | {target} | {verdict} |"


def check(rows, memory_rows=()):
    """Markdown table: target, measured, verdict."""
    lines = ["| target | measured | wanted | verdict |", "|---|---|---|---|"]

    route = _find(rows, "route", "T=16384 E=128 k=8")
    clone = _find(rows, "logits.clone (baseline)", "T=16384 E=128 k=8")
    if route:
        ratio = route[0]["ratio_vs_ref"]
        lines.append(_line("route vs reference, T=16384 E=128 k=8", f"{ratio:.1f}x", ">= 5x",
                           ratio >= 5))
    if route and clone:
        rel = route[0]["median_us"] / clone[0]["median_us"]
        lines.append(_line("route time / logits copy time", f"{rel:.2f}", "<= 2", rel <= 2))

    pipe = _find(rows, "dispatch+permute+unpermute")
    if pipe:
        worst_ratio = min(r["ratio_vs_ref"] for r in pipe)
        worst_bw = min(r["pct_ceiling"] for r in pipe)
        lines.append(_line("dispatch+permute+unpermute vs reference (worst case)",
                           f"{worst_ratio:.2f}x", ">= 1.5x", worst_ratio >= 1.5))
        lines.append(_line("dispatch+permute+unpermute, % copy bandwidth (worst case)",
                           f"{worst_bw:.0f}%", ">= 60%", worst_bw >= 60))

    for skew, wanted in [("uniform", 90), ("extreme", 80)]:
        gmm = _find(rows, "grouped_mm", skew)
        if gmm:
            worst = min(r["pct_ceiling"] for r in gmm)
            lines.append(_line(f"grouped_mm % dense GEMM, {skew} (worst shape)", f"{worst:.0f}%",
                               f">= {wanted}%", worst >= wanted))

    big = _find(rows, "moe_ffn fwd+bwd", "E=8 k=2")
    if big:
        pct, ratio = big[0]["pct_ceiling"], big[0]["ratio_vs_ref"]
        lines.append(_line("moe_ffn fwd+bwd % dense GEMM, E=8 k=2 I=2816", f"{pct:.0f}%",
                           ">= 75%", pct >= 75))
        lines.append(_line("moe_ffn fwd+bwd vs reference, E=8 k=2 I=2816", f"{ratio:.2f}x",
                           ">= 1.15x", ratio >= 1.15))
    small = _find(rows, "moe_ffn fwd+bwd", "E=128 k=8")
    if small:
        ratio = small[0]["ratio_vs_ref"]
        lines.append(_line("moe_ffn fwd+bwd vs reference, E=128 k=8 I=256", f"{ratio:.2f}x",
                           ">= 1.5x", ratio >= 1.5))
    for ours in _find(rows, "moe_ffn fwd+bwd"):
        compiled = [r for r in _find(rows, "torch.compile(reference) fwd+bwd")
                    if r["shape"] == ours["shape"]]
        if compiled:
            rel = compiled[0]["median_us"] / ours["median_us"]
            label = ours["shape"].split(" T=")[0]
            lines.append(_line(f"moe_ffn vs torch.compile(reference), {label}", f"{rel:.2f}x",
                               ">= 1x", rel >= 1))
    for mem in memory_rows:
        rel = mem["ours_mib"] / mem["ref_mib"]
        lines.append(_line(f"moe_ffn peak memory / reference, {mem['shape']}", f"{rel:.2f}",
                           "<= 1", rel <= 1))
    return "\n".join(lines)
