#!/usr/bin/env python3
"""A/B of two ringpool builds on one workload of `ringpool bench`, in one run.

Runs `BIN bench --quick --workload W --json` for the two builds in alternating order
(before, after, after, before, ...), `--rounds` times each, and prints for every CPU metric
the median of ringpool's figure per build, the ratio after/before, and the same ratio with
each run normalised by the baseline (tokio) that ran in that same bench run, which takes out
most of the host's slow swings. Lower CPU is better: a ratio below 1 means the after build
costs less.

    python3 ci/ab.py --before /tmp/ringpool-old --after target/release/ringpool \
        --workload proxy --rounds 5
"""
import argparse
import json
import statistics
import subprocess
import tempfile


def run(binary, workload, html):
    out = subprocess.run(
        [binary, "bench", "--quick", "--workload", workload, "--json", "--html", html],
        check=True, capture_output=True, text=True,
    ).stdout
    (w,) = json.loads(out)["workloads"]
    return {k: v for k, v in w["metrics"].items() if "cpu" in k}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True)
    p.add_argument("--after", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.rounds):
            order = ["before", "after"] if i % 2 == 0 else ["after", "before"]
            for side in order:
                binary = a.before if side == "before" else a.after
                runs[side].append(run(binary, a.workload, f"{tmp}/r.html"))
    print(f"workload {a.workload}: {a.rounds} alternating runs per build, medians (lower is better)")
    print(f"{'metric':<34} {'before':>9} {'after':>9} {'after/before':>13} {'normalised':>11}")
    for m in sorted(runs["before"][0]):
        b = [r[m]["ringpool"] for r in runs["before"]]
        f = [r[m]["ringpool"] for r in runs["after"]]
        nb = statistics.median(r[m]["ringpool"] / r[m]["baseline"] for r in runs["before"])
        nf = statistics.median(r[m]["ringpool"] / r[m]["baseline"] for r in runs["after"])
        mb, mf = statistics.median(b), statistics.median(f)
        print(f"{m:<34} {mb:>9.4f} {mf:>9.4f} {mf / mb:>12.3f}x {nf / nb:>10.3f}x"
              f"   (before {min(b):.3f}..{max(b):.3f}, after {min(f):.3f}..{max(f):.3f})")


if __name__ == "__main__":
    main()
