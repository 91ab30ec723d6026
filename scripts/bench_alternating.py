"""Before/after timing of whole-volume inference for docs/performance.md (issue 31): alternating runs, medians.

Each variant is a commit of this repository, unpacked with ``git archive`` into ``--workdir`` and run
from there (``PYTHONPATH`` = that tree, so its own ``nexus_monai`` is imported; checked before
timing). Every run is one fresh ``python -m nexus_monai benchmark --json`` process: the README's CPU
default network (that tree's ``bundles/nexus_inr/configs/train.yaml``) with the trained weights
``--weights`` (default: this checkout's ``bundles/nexus_inr/models/model.pt``), one 240 x 240 x 160
volume at 1 mm, ``--skip-train``, at ``--threads`` torch/OpenMP threads; each run includes the
benchmark's own untiled inference, the reference of ``whole_inference_ratio_to_untiled_attainable``.
The variants run in turn, ``--pairs`` rounds (before, after[, previous], then again), so load drift
hits all alike; medians per variant. Run it on a quiet machine: the numbers are only as good as that.

Writes ``<out>/bench_alternating.json`` (every run's summary and the full JSON paths),
``<out>/bench_alternating.md`` (the table) and, with ``--docs``, replaces the block between
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` of that markdown file with the table.

    python scripts/bench_alternating.py --pairs 3 --docs docs/performance.md
    python scripts/bench_alternating.py --pairs 1 --size 48 48 32 --out /tmp/bench_small   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "af26767"  # main just before issue 31's first commit (KD-Attn per-point gathers, encoder-only tile plan)
PREVIOUS = "732585f"  # the previous main the issue compares with (before the auto tile budget)
PARTS = ("encoders", "attention", "fusion_mlps", "decoder_mlps", "other")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def unpack(rev: str, workdir: Path) -> tuple[str, Path]:
    """``(full sha, tree)``: ``rev`` unpacked once under ``workdir`` (reused when already there)."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tree = workdir / sha[:12]
    if not (tree / "nexus_monai" / "__init__.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        archive = workdir / f"{sha[:12]}.tar"
        subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), sha], cwd=REPO, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tree)
        archive.unlink()
    return sha, tree


def child_env(tree: Path, threads: int) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "MLFLOW_DISABLE_TELEMETRY": "true"})
    return env


def check_import(tree: Path, threads: int) -> None:
    out = subprocess.run([sys.executable, "-c", "import nexus_monai; print(nexus_monai.__file__)"], cwd=tree,
                         env=child_env(tree, threads), check=True, capture_output=True, text=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: imports nexus_monai from {out}, not from the unpacked tree")


def summarise(r: dict) -> dict:
    """The numbers of one benchmark JSON this table uses (keys of older versions tolerated)."""
    parts = r.get("parts", {})
    before = r.get("before") or {}
    plan = r.get("plan") or {}
    row = {
        "nexus_s": r["nexus_s"], "encode_s": r.get("encode_s"), "decode_s": r.get("decode_s"),
        "flops": r.get("flops"), "peak_gemm_flops_per_s": r.get("peak_gemm_flops_per_s"),
        "untiled_s": before.get("nexus_s"), "untiled_flops": before.get("flops"),
        "untiled_attainable_s": before.get("attainable_s"),
        "ratio_to_untiled_attainable": r.get("whole_inference_ratio_to_untiled_attainable"),
        "rss_peak_inference_gib": r.get("rss_peak_inference_gib"),
        "rss_peak_process_gib": r.get("rss_peak_process_gib"),
        "max_abs_diff_tiled_untiled": r.get("max_abs_diff_before_after"),
        "tile_shape": plan.get("tile_shape"), "chunk_size": plan.get("chunk_size"),
        "halo_overhead": plan.get("halo_overhead"), "decoded_points": r.get("decoded_points"),
        "memory_bandwidth_bytes_per_s": r.get("memory_bandwidth_bytes_per_s"),
        "load_average_1min": (r.get("machine") or {}).get("load_average_1min"),
        "load_average_1min_end": (r.get("machine") or {}).get("load_average_1min_end"),
    }
    for p in PARTS:
        part = parts.get(p, {})
        row[f"{p}_s"] = part.get("seconds")
        row[f"{p}_flops"] = part.get("flops")
        row[f"{p}_ratio_to_bound"] = part.get("ratio_to_bound")
    return row


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec=".2f", unit=""):
    return "–" if v is None else f"{v:{spec}}{unit}"


def table(variants: list[dict], runs: list[dict], args) -> str:
    """The markdown table: medians per variant, spread of the whole time, the untiled reference."""
    lines = [
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC with `python scripts/bench_alternating.py "
        f"--pairs {args.pairs}{' --size ' + ' '.join(map(str, args.size)) if args.size else ''}` "
        f"({args.threads} thread(s); {len(runs)} benchmark processes, variants alternating; medians; "
        f"load average at the runs' starts {fmt(min(r['load_average_1min'] or 0 for r in runs))}–"
        f"{fmt(max(r['load_average_1min'] or 0 for r in runs))}).",
        "",
        "| variant | runs | whole inference s (min–max) | encoders s | KD-Attn s | MMF/SEL s | decoders s | rest s "
        "| × untiled attainable | peak GEMM | peak RSS inference GiB | tile, chunk |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        mine = [r for r in runs if r["variant"] == v["name"]]
        if not mine:
            continue
        whole = [r["nexus_s"] for r in mine]
        tile = mine[0]["tile_shape"]
        peak = median([r["peak_gemm_flops_per_s"] for r in mine])
        lines.append(
            f"| {v['name']} (`{v['sha'][:7]}`) | {len(mine)} | {fmt(median(whole))} ({fmt(min(whole))}–"
            f"{fmt(max(whole))}) | "
            + " | ".join(fmt(median([r[f'{p}_s'] for r in mine])) for p in PARTS)
            + f" | {fmt(median([r['ratio_to_untiled_attainable'] for r in mine]))} × | "
            f"{fmt(peak / 1e9 if peak else None, '.0f')} GFLOP/s | "
            f"{fmt(max(r['rss_peak_inference_gib'] or 0 for r in mine))} | "
            f"{'x'.join(map(str, tile)) if tile else 'untiled'}, {mine[0]['chunk_size'] or '–'} |")
    notes = []
    for v in variants:
        mine = [r for r in runs if r["variant"] == v["name"]]
        if mine:
            flops = median([r["untiled_flops"] for r in mine])
            notes.append(f"{v['name']}: {fmt(flops / 1e9 if flops else None, '.0f')} GFLOP, attainable "
                         f"{fmt(median([r['untiled_attainable_s'] for r in mine]))} s, max |tiled - untiled| "
                         f"{fmt(max((r['max_abs_diff_tiled_untiled'] or 0) for r in mine), '.1e')}")
    lines += ["", "Untiled reference of each variant (the same process's untiled run, the benchmark's "
              "'before'): " + "; ".join(notes) + "."]
    bounded = [r for r in runs if r.get("attention_ratio_to_bound") is not None]
    if bounded:  # variants whose benchmark reports each part's own bound (issue 31 on)
        lines += ["", "Each part's time / its own bound (FLOPs at the peak GEMM or bytes at the measured memory "
                  "bandwidth, the larger), medians: "
                  + "; ".join(f"{v['name']}: " + ", ".join(
                      f"{p} {fmt(median([r[f'{p}_ratio_to_bound'] for r in bounded if r['variant'] == v['name']]))}×"
                      for p in PARTS)
                      for v in variants if any(r["variant"] == v["name"] for r in bounded))
                  + f"; memory bandwidth "
                  f"{fmt(median([r['memory_bandwidth_bytes_per_s'] for r in bounded]) / 1e9)} GB/s."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=BEFORE, help=f"commit before the change (default {BEFORE})")
    ap.add_argument("--after", default="HEAD", help="commit after the change (default HEAD)")
    ap.add_argument("--previous", default=PREVIOUS, help=f"the previous main beside ('' to skip; default {PREVIOUS})")
    ap.add_argument("--pairs", type=int, default=3, help="rounds of alternating runs (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads of every run (default 2)")
    ap.add_argument("--size", type=int, nargs=3, default=None,
                    help="output volume (default: the benchmark's 240 240 160)")
    ap.add_argument("--weights", default=str(REPO / "bundles" / "nexus_inr" / "models" / "model.pt"))
    ap.add_argument("--workdir", default="/tmp/nexus_bench_trees", help="where the commits are unpacked")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "performance"), help="output folder")
    ap.add_argument("--docs", default=None, help="markdown file whose bench block gets the table")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark process")
    args = ap.parse_args()
    if not Path(args.weights).is_file():
        raise SystemExit(f"{args.weights}: no such checkpoint (--weights)")
    workdir, out = Path(args.workdir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = []
    for name, rev in (("before", args.before), ("after", args.after), ("previous main", args.previous)):
        if rev:
            sha, tree = unpack(rev, workdir)
            check_import(tree, args.threads)
            variants.append({"name": name, "rev": rev, "sha": sha, "tree": str(tree)})
    runs: list[dict] = []
    t_start = time.time()
    for rnd in range(args.pairs):
        order = variants if rnd % 2 == 0 else variants[::-1]  # ABC CBA ABC: each variant early and late alike
        for v in order:
            path = out / "runs" / f"{v['name'].replace(' ', '_')}_{rnd + 1}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "nexus_monai", "benchmark", "--json", str(path), "--skip-train", "--quiet",
                   "--threads", str(args.threads), "--weights", str(Path(args.weights).resolve())]
            if args.size:
                cmd += ["--size", *map(str, args.size)]
            t0 = time.time()
            load = os.getloadavg()[0]
            print(f"[{time.time() - t_start:7.0f} s] round {rnd + 1}/{args.pairs}: {v['name']} ({v['sha'][:7]}), "
                  f"load {load:.2f}" + ("  WARNING: the machine is not quiet, these timings are contended"
                                        if load > 0.5 * (os.cpu_count() or 2) else ""), flush=True)
            proc = subprocess.run(cmd, cwd=v["tree"], env=child_env(Path(v["tree"]), args.threads),
                                  capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode != 0:
                raise SystemExit(f"{v['name']} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            row = summarise(json.loads(path.read_text()))
            row.update({"variant": v["name"], "sha": v["sha"], "round": rnd + 1, "wall_s": time.time() - t0,
                        "json": str(path)})
            runs.append(row)
            print(f"          whole {row['nexus_s']:.2f} s, x untiled attainable "
                  f"{fmt(row['ratio_to_untiled_attainable'])}, peak RSS {fmt(row['rss_peak_inference_gib'])} GiB, "
                  f"process {row['wall_s']:.0f} s", flush=True)
            (out / "bench_alternating.json").write_text(json.dumps(
                {"variants": variants, "runs": runs, "threads": args.threads, "size": args.size,
                 "pairs": args.pairs, "weights": args.weights}, indent=1))
    md = table(variants, runs, args)
    (out / "bench_alternating.md").write_text(md)
    print(md)
    if args.docs:
        doc = Path(args.docs)
        text = doc.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"{doc}: no {BEGIN} ... {END} block to fill")
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        doc.write_text(head + BEGIN + "\n" + md + END + tail)
        print(f"table written into {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
