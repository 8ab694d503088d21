"""`rlhf-online bench all`: every benchmark in one go, collected into all.json and all.md.

Each benchmark runs with its own defaults and writes its own JSON and table first; the collection
then holds them all with the machine and date, so docs/benchmarks.md can quote one file.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import time
from pathlib import Path

from rlhf_online.bench.common import machine

BENCHES = ("serving", "ingest", "reward", "ppo-round", "ppo", "reward-accuracy", "canary")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the collection."""
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {', '.join(BENCHES)}")
    p.add_argument("--out", default="bench-results")


def _module(name: str):
    return importlib.import_module(f"rlhf_online.bench.{name.replace('-', '_')}")


def main(args: argparse.Namespace) -> int:
    """Run the chosen benchmarks one after another (never in parallel: they would share the cores)."""
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}")
    out = Path(args.out)
    runs: dict[str, dict] = {}
    for name in names:
        sub = argparse.ArgumentParser(prog=f"bench {name}")
        _module(name).add_arguments(sub)
        bench_args = sub.parse_args([])
        bench_args.out = str(out)
        note = ""
        if name == "ppo" and importlib.util.find_spec("trl") is None:
            bench_args.sides, note = "ours", "TRL is not installed here: ours only (make bench-ppo runs both sides)"
        print(f"\n=== bench {name} {('(' + note + ')') if note else ''}", flush=True)
        t0 = time.time()
        try:
            rc = _module(name).main(bench_args)
        except Exception as e:  # one failing benchmark must not hide the others' figures
            rc, note = 1, f"failed: {type(e).__name__}: {e}"
            print(f"bench {name} {note}", flush=True)
        runs[name] = {"exit_code": rc, "seconds": round(time.time() - t0, 1), "note": note}
    results = {}
    for name in names:
        path = out / f"{name.replace('-', '_')}.json"
        if runs[name]["exit_code"] == 0 and path.is_file():
            results[name] = json.loads(path.read_text())
    collected = {"benchmark": "all", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "runs": runs, "results": results}
    (out / "all.json").write_text(json.dumps(collected, indent=2))
    lines = [f"# Benchmarks — {collected['machine']}, {collected['date']}", ""]
    for name in names:
        md = out / f"{name.replace('-', '_')}.md"
        lines += [f"## bench {name} ({runs[name]['seconds']:.0f} s{', ' + runs[name]['note'] if runs[name]['note'] else ''})",
                  "", md.read_text().strip() if name in results and md.is_file() else "(no result)", ""]
    (out / "all.md").write_text("\n".join(lines))
    print(f"\nWrote {out / 'all.json'} and {out / 'all.md'}")
    return 0 if all(r["exit_code"] == 0 for r in runs.values()) else 1
