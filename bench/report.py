"""Turn raw records into derived numbers (roofline, ratios to torch, targets) and write the terminal table,
JSON, Markdown and PNG plots."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

BASELINE = "torch"
# the baselines every row is compared with: full logits in torch, and TRL 1.16's own chunked path
PEERS = ("torch", "trl")
OURS = ("ours-auto", "ours-fused", "ours-chunked")
MiB = 2**20

# ------------------------------------------------------------------------------------------------ derived


def _group_key(case: dict) -> tuple:
    return (case["mode"], case["preset"], case["dtype"], case["pad_frac"], case["zero_adv_frac"])


def finalize(res: dict) -> dict:
    """Add per-record roofline and ratios to the torch baseline of the same case, and the targets."""
    from .measure import roofline

    gemm = res.get("env", {}).get("gemm", {})
    by_key = {(r["impl"], r["case"]["key"]): r for r in res["records"]}
    for r in res["records"]:
        if r.get("status") != "ok":
            continue
        c = r["case"]
        med = r["time"]["median_ms"]
        r["roofline"] = roofline(c["flops"], med, (gemm.get(c["dtype"]) or {}).get("tflops"))
        for peer in PEERS:
            base = by_key.get((peer, c["key"]))
            if base is not None and base.get("status") == "ok":
                r[f"speedup_vs_{peer}"] = base["time"]["median_ms"] / med
                be, me = base.get("extra_bytes"), r.get("extra_bytes")
                r[f"mem_vs_{peer}"] = (me / be) if (be and me is not None and be > 0) else None
    res["targets"] = evaluate_targets(res)
    return res


def _find(res: dict, impl: str, **case) -> dict | None:
    for r in res["records"]:
        if r["impl"] == impl and r.get("status") == "ok" and all(r["case"].get(k) == v for k, v in case.items()):
            return r
    return None


def _noise_note(a: dict, b: dict) -> str:
    """Say so when two timings' p20-p80 ranges overlap: their order is then not settled by this run."""
    ta, tb = a.get("time", {}), b.get("time", {})
    if None in (ta.get("p20_ms"), ta.get("p80_ms"), tb.get("p20_ms"), tb.get("p80_ms")):
        return ""
    overlap = ta["p20_ms"] <= tb["p80_ms"] and tb["p20_ms"] <= ta["p80_ms"]
    return "p20-p80 ranges overlap: within noise" if overlap else ""


def evaluate_targets(res: dict) -> list[dict]:
    """The issue's targets, checked against whatever of them this run measured (never asserted)."""
    env = res.get("env", {})
    recs = res["records"]
    out: list[dict] = []

    def row(target, impl, measured, met, note=""):
        out.append({"target": target, "impl": impl, "measured": measured, "met": met, "note": note})

    loss = [r for r in recs if r["case"]["mode"] == "loss"]
    ours = [i for i in OURS if any(r["impl"] == i for r in loss)]
    if not loss:
        return out
    # CPU --quick: at the largest quick shape, beat torch in time and use <= 1/4 of its extra memory.
    if env.get("device_type") == "cpu":
        quick = [r for r in loss if r["case"]["preset"] == "quick" and r["case"]["pad_frac"] == 0 and r["case"]["zero_adv_frac"] == 0]
        if quick:
            n = max(r["case"]["tokens"] for r in quick)
            dt = "fp32" if any(r["case"]["dtype"] == "fp32" for r in quick) else quick[0]["case"]["dtype"]
            sel = dict(preset="quick", tokens=n, dtype=dt, pad_frac=0.0, zero_adv_frac=0.0)
            base = _find(res, BASELINE, **sel)
            for impl in ours:
                r = _find(res, impl, **sel)
                if r is None or base is None:
                    row(f"CPU quick N={n}: faster than torch", impl, None, None, "not measured")
                    continue
                s = base["time"]["median_ms"] / r["time"]["median_ms"]
                row(f"CPU quick N={n}: faster than torch", impl, f"{s:.2f}x torch", s > 1.0, _noise_note(r, base))
                m = r.get("mem_vs_torch")
                row(
                    f"CPU quick N={n}: extra memory <= 25% of torch's",
                    impl,
                    None if m is None else f"{100 * m:.1f}%",
                    None if m is None else m <= 0.25,
                )
        return out
    return out + gpu_targets(res)


# The H100 targets (bf16, llama3-8b LM head: H=4096, V=128256, dapo, beta 0), all for ours-auto except
# the last, which is the fused strategy's own floor at 64k tokens.
GPU_SHAPE = dict(mode="loss", hidden=4096, vocab=128256, dtype="bf16", pad_frac=0.0)
GPU_N, GPU_N_LONG = 8192, 65536
GPU_HINT = "python -m bench gpu (or: python -m bench loss --preset llama3-8b --tokens 8192 --impls all --zero-adv-frac 0,0.5)"


def gpu_targets(res: dict) -> list[dict]:
    """ours-auto at N=8192 against the GEMM floor, torch, trl and liger; half zero-advantage; fused at 64k."""
    env = res.get("env", {})
    out: list[dict] = []

    def row(target, impl, measured, met, note=""):
        out.append({"target": target, "impl": impl, "measured": measured, "met": met, "note": note})

    name = str(env.get("device_name", ""))
    dev_note = "" if "h100" in name.lower() else f"targets are for an H100; this is {name or 'an unknown device'}"
    sel = dict(GPU_SHAPE, tokens=GPU_N, zero_adv_frac=0.0)
    r = _find(res, "ours-auto", **sel)
    head = f"llama3-8b bf16 N={GPU_N}: "
    if r is None:
        row(head + "ours-auto measured", "ours-auto", None, None, "not measured; run " + GPU_HINT)
    else:
        t = r["time"]["median_ms"]
        xf = (r.get("roofline") or {}).get("x_floor")
        row(head + "fwd+bwd <= 1.25x the 6NHV floor", "ours-auto", None if xf is None else f"{xf:.2f}x floor",
            None if xf is None else xf <= 1.25, dev_note or "floor at the GEMM rate measured in the same run")
        for peer, need in (("torch", 1.3), ("trl", 1.3), ("liger", 3.0)):
            b = _find(res, peer, **sel)
            if b is None:
                row(head + f">= {need:g}x faster than {peer}", "ours-auto", None, None, f"{peer} not measured")
                continue
            s_ = b["time"]["median_ms"] / t
            row(head + f">= {need:g}x faster than {peer}", "ours-auto", f"{s_:.2f}x", s_ >= need,
                "; ".join(x for x in (dev_note, _noise_note(r, b)) if x))
        for peer in ("torch", "trl"):
            b = _find(res, peer, **sel)
            be, me = (b or {}).get("extra_bytes"), r.get("extra_bytes")
            if not be or me is None:
                row(head + f"extra memory <= 15% of {peer}'s", "ours-auto", None, None, f"{peer} memory not measured")
                continue
            row(head + f"extra memory <= 15% of {peer}'s", "ours-auto", f"{100 * me / be:.1f}% ({me / MiB:.0f} vs {be / MiB:.0f} MiB)",
                me / be <= 0.15, dev_note)
        half = _find(res, "ours-auto", **{**sel, "zero_adv_frac": 0.5})
        if half is None:
            row(head + "half the sequences at zero advantage: <= 0.55x the time", "ours-auto", None, None,
                "not measured (--zero-adv-frac 0,0.5)")
        else:
            q = half["time"]["median_ms"] / t
            row(head + "half the sequences at zero advantage: <= 0.55x the time", "ours-auto", f"{q:.2f}x the time",
                q <= 0.55, dev_note)
    long = _find(res, "ours-fused", **dict(GPU_SHAPE, tokens=GPU_N_LONG, zero_adv_frac=0.0))
    target = f"llama3-8b bf16 N={GPU_N_LONG}: fused within 1.5x of its 8NHV floor"
    floor6 = ((long or {}).get("roofline") or {}).get("floor_ms")  # 6NHV at the GEMM rate of that run
    if long is None or not floor6:
        row(target, "ours-fused", None, None, "not measured" if long is None else "no bf16 GEMM rate measured")
    else:
        floor_ms = floor6 * 8.0 / 6.0
        x = long["time"]["median_ms"] / floor_ms
        row(target, "ours-fused", f"{x:.2f}x ({long['time']['median_ms']:.0f} ms vs {floor_ms:.0f} ms)", x <= 1.5, dev_note)
    return out


# ------------------------------------------------------------------------------------------------ formatting


def _f(v, fmt="{:.2f}", none="-"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return fmt.format(v)


def _check_err(r: dict) -> str:
    chk = r.get("check") or {}
    errs = chk.get("errors")
    if not errs:
        return "-"
    finite = [v for v in errs.values() if isinstance(v, (int, float))]
    return _f(max(finite), "{:.1e}") if finite else "-"


COLUMNS = [
    "impl",
    "N",
    "status",
    "median ms",
    "p20-p80 ms",
    "speed vs torch",
    "speed vs trl",
    "extra MiB",
    "expected MiB",
    "mem vs torch",
    "TFLOP/s",
    "% GEMM",
    "x floor",
    "check err",
    "note",
]


def table_rows(res: dict) -> dict[tuple, tuple[list[list[str]], list[str]]]:
    """Per group: table rows (one per measured or failed-to-measure case) and notes (implementations that
    are unavailable or failed the correctness gate: per implementation, not per case)."""
    groups: dict[tuple, tuple[list[list[str]], list[str]]] = defaultdict(lambda: ([], []))
    order = {n: i for i, n in enumerate(res.get("meta", {}).get("impls", []))}
    recs = sorted(res["records"], key=lambda r: (_group_key(r["case"]), r["case"]["tokens"], order.get(r["impl"], 99)))
    for r in recs:
        c = r["case"]
        rows, notes = groups[_group_key(c)]
        status = r.get("status", "?")
        reason = (r.get("error") or "").replace("|", "/").replace("\n", " ")
        if status in ("unavailable", "failed"):
            note = f"{r['impl']}: {'unavailable' if status == 'unavailable' else 'FAILED the correctness gate'} ({reason})"
            if note not in notes:
                notes.append(note)
            continue
        t = r.get("time") or {}
        rl = r.get("roofline") or {}
        if status == "ok":
            cells = [
                _f(t.get("median_ms"), "{:.2f}"),
                f"{_f(t.get('p20_ms'), '{:.2f}')}-{_f(t.get('p80_ms'), '{:.2f}')}",
                _f(r.get("speedup_vs_torch"), "{:.2f}x"),
                _f(r.get("speedup_vs_trl"), "{:.2f}x"),
                _f(None if r.get("extra_bytes") is None else r["extra_bytes"] / MiB, "{:.1f}"),
                _f(None if r.get("expected_bytes") is None else r["expected_bytes"] / MiB, "{:.1f}"),
                _f(None if r.get("mem_vs_torch") is None else 100 * r["mem_vs_torch"], "{:.1f}%"),
                _f(rl.get("tflops"), "{:.3f}"),
                _f(rl.get("pct_gemm"), "{:.1f}"),
                _f(rl.get("x_floor"), "{:.2f}"),
                _check_err(r),
                "",
            ]
        else:
            cells = ["-"] * 10 + [_check_err(r), reason[:160]]
        rows.append([r["impl"], str(c["tokens"]), status if status == "ok" else status.upper(), *cells])
    return groups


def _drop_empty_notes(rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    if any(row[-1] for row in rows):
        return COLUMNS, rows
    return COLUMNS[:-1], [row[:-1] for row in rows]


def _group_title(key: tuple, res: dict) -> str:
    mode, preset, dtype, pad, zadv = key
    h, v = None, None
    for r in res["records"]:
        if _group_key(r["case"]) == key:
            h, v = r["case"]["hidden"], r["case"]["vocab"]
            break
    what = "loss forward+backward" if mode == "loss" else "log-probs forward"
    return f"{what} | {preset} (H={h}, V={v}) | {dtype} | pad {pad:g} | zero-adv {zadv:g}"


def _env_line(res: dict) -> str:
    env, meta = res.get("env", {}), res.get("meta", {})
    g = ", ".join(f"{k} {_f(v.get('tflops'), '{:.3f}')} TFLOP/s" for k, v in env.get("gemm", {}).items())
    commit = (meta.get("commit") or "no commit")[:12] + (" (dirty)" if meta.get("dirty") else "")
    return (
        f"{env.get('device_name')} | torch {env.get('torch')} | triton {env.get('triton')} | CUDA {env.get('cuda')} | "
        f"liger {env.get('liger_kernel')} | cce {env.get('cut_cross_entropy')} | git {commit} | {meta.get('date')} | GEMM: {g}"
    )


def print_table(res: dict, file=None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(to_markdown(res), file=file)
        return
    console = Console(file=file, width=180)
    console.print(_env_line(res))
    for key, (rows, notes) in table_rows(res).items():
        table = Table(title=_group_title(key, res), show_lines=False, header_style="bold")
        cols, rows = _drop_empty_notes(rows)
        for col in cols:
            table.add_column(col, justify="left" if col in ("impl", "status") else "right", overflow="fold")
        for row in rows:
            style = None if row[2] == "ok" else ("red" if row[2] in ("FAILED", "ERROR", "CRASHED") else "dim")
            table.add_row(*row, style=style)
        console.print(table)
        for note in notes:
            console.print("  " + note, style="red" if "FAILED" in note else "dim")
    if res.get("targets"):
        t = Table(title="targets (shown, never asserted)", header_style="bold")
        for col in ("target", "impl", "measured", "met", "note"):
            t.add_column(col, overflow="fold")
        for r in res["targets"]:
            met = "-" if r["met"] is None else ("met" if r["met"] else "NOT met")
            t.add_row(r["target"], r["impl"], r["measured"] or "-", met, r["note"], style=None if r["met"] is not False else "red")
        console.print(t)


def to_markdown(res: dict) -> str:
    meta = res.get("meta", {})
    lines = [f"# bench {meta.get('mode')} results", "", _env_line(res), ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    opts = meta.get("opts") or {}
    lines += [
        "Loss options: " + ", ".join(f"{k}={v}" for k, v in opts.items()) + ". Time: median of the reps (p20-p80); "
        "extra memory: peak above the inputs during one call (gradients included); "
        "TFLOP/s on " + ("6" if meta.get("mode") == "loss" else "2") + "·N·H·V; % GEMM and x floor against the "
        "matmul rate measured in this run.",
        "",
    ]
    for key, (rows, notes) in table_rows(res).items():
        cols, rows = _drop_empty_notes(rows)
        lines += [f"## {_group_title(key, res)}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
        lines += [f"- {note}" for note in notes]
        if notes:
            lines.append("")
    if res.get("targets"):
        lines += ["## Targets (shown, never asserted)", "", "| target | impl | measured | met | note |", "|---|---|---|---|---|"]
        for r in res["targets"]:
            met = "-" if r["met"] is None else ("met" if r["met"] else "**not met**")
            lines.append(f"| {r['target']} | {r['impl']} | {r['measured'] or '-'} | {met} | {r['note']} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ files


def _clean(obj):
    """JSON without NaN/Infinity literals (strict parsers reject them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def plot(res: dict, out: Path, tag: str) -> list[Path]:
    """One PNG per (preset, dtype, pad, zero-adv) group: time and extra memory vs tokens, a line per impl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in res["records"]:
        if r.get("status") == "ok":
            groups[_group_key(r["case"])][r["impl"]].append(r)
    for key, by_impl in groups.items():
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
        for impl, rs in sorted(by_impl.items()):
            rs = sorted(rs, key=lambda r: r["case"]["tokens"])
            n = [r["case"]["tokens"] for r in rs]
            style = "-o" if impl.startswith("ours") else "--s"
            ax_t.plot(n, [r["time"]["median_ms"] for r in rs], style, label=impl)
            mem = [(r["case"]["tokens"], r["extra_bytes"] / MiB) for r in rs if r.get("extra_bytes") is not None]
            if mem:
                ax_m.plot([a for a, _ in mem], [b for _, b in mem], style, label=impl)
        for ax, ylabel in ((ax_t, "time per call (ms, median)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ys = [y for line in ax.get_lines() for y in line.get_ydata()]
            if ys and min(ys) > 0:  # tiny shapes can measure ~0 MiB: stay linear then
                ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(_group_title(key, res) + f"\n{res.get('env', {}).get('device_name')}", fontsize=9)
        fig.tight_layout()
        mode, preset, dtype, pad, zadv = key
        stem = tag if preset in tag else f"{tag}-{preset}"
        p = out / f"{stem}-{dtype}-pad{pad:g}-zadv{zadv:g}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def write_all(res: dict, out: Path, tag: str, plots: bool = True, markdown: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{tag}.json"
    tmp = out / f".{tag}.json.tmp"  # write then rename: a reader (or a kill) never sees half a file
    tmp.write_text(json.dumps(_clean(res), indent=1, default=str) + "\n")
    tmp.replace(js)
    paths = [js]
    if markdown:
        md = out / f"{tag}.md"
        md.write_text(to_markdown(res) + "\n")
        paths.append(md)
    if plots:
        paths += plot(res, out, tag)
    return paths


def rerender(path: Path, plots: bool = True) -> list[Path]:
    """Rebuild the derived numbers, Markdown and plots of a saved JSON (e.g. one fetched from a GPU machine)."""
    res = json.loads(Path(path).read_text())
    if res.get("meta", {}).get("mode") == "step":
        raise ValueError(f"{path} is a step benchmark; its Markdown is written by `python -m bench step`")
    res = finalize(res)
    paths = write_all(res, Path(path).parent, Path(path).stem, plots=plots)
    print_table(res)
    return paths
