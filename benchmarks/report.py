"""Turn a pytest-benchmark JSON into a compact summary: a Markdown table, a small JSON and a PNG.

    python -m benchmarks.report RESULTS.json [--out PREFIX]

writes ``PREFIX.md``, ``PREFIX.summary.json`` and ``PREFIX.png`` (PREFIX defaults to RESULTS
without ``.json``). The input may be pytest-benchmark's raw output or a summary this tool wrote
(so a committed summary can be re-rendered). The raw file holds every round of every benchmark
(megabytes); the summary keeps what the figures are: the device, the versions, the shapes, the
median time per call and the ratios.

Ratios are computed here, within each benchmark group, not by the benchmarks themselves:
``x eager`` / ``x compile`` / ``x HF`` / ``x naive`` are the baseline's time over this row's
(above 1: this row is faster); ``latent / text`` is a latent decode step's time over a text step's;
``share of train_step`` is the head's time (bench_train's ``train_head``) over the whole training
step's, the same implementation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

BASELINES = {"eager": "x eager", "compiled": "x compile", "hf": "x HF", "naive": "x naive"}
PARTS = {"train_head": "train_step"}  # a part's group -> the group of the whole it is timed within
SHAPE_KEYS = ("D", "d", "B", "K", "layers", "new", "dtype")


def _impl(bench: dict) -> str:
    info = bench.get("extra_info", {})
    return str(info.get("impl") or info.get("mode") or bench.get("param") or bench["name"])


def _row(bench: dict) -> dict:
    info = bench.get("extra_info", {})
    median = bench["stats"]["median"] / info.get("inner_calls", 1)
    return {
        "group": bench.get("group") or bench["name"],
        "name": bench["name"],
        "op": info.get("op", bench["name"].split("[")[0].removeprefix("test_")),
        "impl": _impl(bench),
        "shape": {k: info[k] for k in SHAPE_KEYS if k in info},
        "device": info.get("device"),
        "us": round(median * 1e6, 3),
        "rounds": bench["stats"].get("rounds"),
        "gbps": round(info["bytes_moved"] / median / 1e9, 2) if info.get("bytes_moved") else None,
        "frac_peak": info.get("fraction_of_peak_bandwidth"),
    }


def _add_ratios(rows: list[dict]) -> None:
    groups: dict[str, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], {})[r["impl"]] = r
    for members in groups.values():
        for r in members.values():
            r["ratios"] = {label: round(members[base]["us"] / r["us"], 3)
                           for base, label in BASELINES.items() if base in members and base != r["impl"]}
        if "latent" in members and "text" in members:
            members["latent"]["ratios"]["latent / text"] = round(members["latent"]["us"] / members["text"]["us"], 3)
    for part, whole in PARTS.items():  # the part's share of the whole, same implementation
        for impl, r in groups.get(part, {}).items():
            if impl in groups.get(whole, {}):
                r["ratios"][f"share of {whole}"] = round(r["us"] / groups[whole][impl]["us"], 4)


def _machine(data: dict) -> dict:
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {})
    return {
        "gpu": info.get("gpu"),
        "cpu": f"{cpu.get('brand_raw', '?')} x{cpu.get('count', '?')}" if cpu else None,
        "versions": info.get("gapkern_versions"),
        "datetime": data.get("datetime"),
        "commit": (data.get("commit_info") or {}).get("id"),
    }


def summarize(data: dict) -> dict:
    """The summary of a raw pytest-benchmark result (a summary passes through unchanged)."""
    if "rows" in data and "machine" in data:
        return data
    if "benchmarks" not in data:
        raise ValueError("RESULTS: expected a pytest-benchmark JSON (a 'benchmarks' list) or a summary of one")
    rows = [_row(b) for b in data["benchmarks"]]
    _add_ratios(rows)
    return {"machine": _machine(data), "rows": rows}


def _shape(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if k != "dtype") + (
        f" {shape['dtype'].removeprefix('torch.')}" if "dtype" in shape else "")


def markdown(summary: dict) -> str:
    m = summary["machine"]
    gpu = m.get("gpu")
    device = f"{gpu['name']} (sm {gpu['sm']}, peak {gpu.get('peak_bandwidth_gbps')} GB/s)" if gpu else f"CPU {m['cpu']}"
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
    lines = [f"Device: {device}  ", f"Versions: {versions}  ", f"Run: {m.get('datetime')} (commit {m.get('commit')})",
             "", "| op | shape | impl | µs / call | GB/s | % of peak | ratios |", "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in summary["rows"]:
        peak = f"{100 * r['frac_peak']:.1f}" if r.get("frac_peak") else ""
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in r.get("ratios", {}).items())
        lines.append(f"| {r['op']} | {_shape(r['shape'])} | {r['impl']} | {r['us']:.1f} | "
                     f"{'' if r['gbps'] is None else r['gbps']} | {peak} | {ratios} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    """One horizontal bar per row, grouped, log-scale µs per call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    colours = {impl: f"C{i % 10}" for i, impl in enumerate(dict.fromkeys(r["impl"] for r in rows))}
    labels = [f"{r['group']} · {r['impl']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [r["us"] for r in rows], color=[colours[r["impl"]] for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("µs per call (median)")
    gpu = summary["machine"].get("gpu")
    ax.set_title(gpu["name"] if gpu else f"CPU {summary['machine'].get('cpu')}", fontsize=9)
    fig.tight_layout()
    from gapkern._io import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _write_text(path: str, text: str) -> None:
    from gapkern._io import atomic_write

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write(summary: dict, prefix: str) -> list[str]:
    paths = [f"{prefix}.md", f"{prefix}.summary.json", f"{prefix}.png"]
    _write_text(paths[0], markdown(summary))
    _write_text(paths[1], json.dumps(summary, indent=1) + "\n")
    plot(summary, paths[2])
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a pytest-benchmark JSON (--benchmark-json) or a summary of one")
    parser.add_argument("--out", metavar="PREFIX", help="output prefix (default: RESULTS without .json)")
    args = parser.parse_args(argv)
    try:
        with open(args.results) as f:
            data = json.load(f)
        summary = summarize(data)
    except (OSError, ValueError) as exc:
        print(f"benchmarks.report: error: {args.results}: {exc}", file=sys.stderr)
        return 2
    prefix = args.out or os.path.splitext(args.results)[0].removesuffix(".summary")
    for path in write(summary, prefix):
        print(path)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
