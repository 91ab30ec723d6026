"""Latency and throughput of a running ``nexus-sr serve`` (client side, standard library only).

    python -m nexus_monai.serving.loadtest --url http://127.0.0.1:8000 --t1 T1_LR.nii.gz --t2 T2_LR.nii.gz \\
        --params '{"spacing": 1}' --sequential 3 --clients 8 --json results/serve_load.json

Sequential: one warm-up request, then ``--sequential`` requests one after another (latency of
one request on an idle server). Concurrent: ``--clients`` threads each send ``--per-client``
requests at once (throughput = requests / wall time; latency percentiles include queueing).
Every answer must be 200 with a zip holding both contrasts, or the run fails.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["multipart_body", "post_infer", "run_load"]


def multipart_body(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """``(body, content type)`` of a ``multipart/form-data`` request."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, value in fields.items():
        chunks += [f'--{boundary}\r\ncontent-disposition: form-data; name="{name}"\r\n\r\n'.encode(), value.encode(),
                   b"\r\n"]
    for name, (filename, data) in files.items():
        chunks += [f'--{boundary}\r\ncontent-disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   "content-type: application/octet-stream\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def post_infer(url: str, model: str, body: bytes, content_type: str, timeout: float = 600) -> tuple[int, bytes, float]:
    """``(status, body, seconds)`` of one ``POST /infer/{model}?output=zip``."""
    request = urllib.request.Request(f"{url.rstrip('/')}/infer/{model}?output=zip", data=body, method="POST",
                                     headers={"content-type": content_type})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, content = answer.status, answer.read()
    except urllib.error.HTTPError as err:
        status, content = err.code, err.read()
    return status, content, time.perf_counter() - start


def _check(status: int, content: bytes) -> None:
    if status != 200:
        raise RuntimeError(f"server answered {status}: {content[:300]!r}")
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        names = set(archive.namelist())
    if not {"t1w_sr.nii.gz", "t2w_sr.nii.gz"} <= names:
        raise RuntimeError(f"zip without both contrasts: {sorted(names)}")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_load(url: str, t1: Path, t2: Path, model: str = "nexus_inr", params: str = "{}", sequential: int = 3,
             clients: int = 8,
             per_client: int = 1) -> dict:
    """Measure; returns every number (seconds, requests/s)."""
    body, ctype = multipart_body({"params": params},
                                 {"t1": (Path(t1).name, Path(t1).read_bytes()),
                                  "t2": (Path(t2).name, Path(t2).read_bytes())})
    status, content, warmup = post_infer(url, model, body, ctype)
    _check(status, content)
    meta = json.loads(zipfile.ZipFile(io.BytesIO(content)).read("result.json"))
    seq = []
    for _ in range(sequential):
        status, content, seconds = post_infer(url, model, body, ctype)
        _check(status, content)
        seq.append(seconds)

    def one(_):
        status, content, seconds = post_infer(url, model, body, ctype)
        _check(status, content)
        return seconds

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = list(pool.map(one, range(clients * per_client)))
    wall = time.perf_counter() - start
    return {"model": model, "output_grid": meta["grid"]["shape"], "output_spacing_mm": meta["grid"]["spacing_mm"],
            "inputs": {c: v["shape"] for c, v in meta["inputs"].items()}, "upload_bytes": len(body),
            "warmup_s": warmup, "sequential_s": seq, "sequential_median_s": statistics.median(seq) if seq else None,
            "server_inference_s": meta["latency_s"]["inference"], "clients": clients, "requests": len(lat),
            "concurrent_wall_s": wall,
            "throughput_rps": len(lat) / wall, "concurrent_latency_p50_s": _percentile(lat, 0.5),
            "concurrent_latency_p95_s": _percentile(lat, 0.95), "concurrent_latency_max_s": max(lat)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nexus_monai.serving.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--model", default="nexus_inr")
    p.add_argument("--t1", required=True)
    p.add_argument("--t2", required=True)
    p.add_argument("--params", default="{}", help="params JSON sent with every request")
    p.add_argument("--sequential", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=1)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    result = run_load(args.url, Path(args.t1), Path(args.t2), args.model, args.params, args.sequential, args.clients,
                      args.per_client)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        from nexus_monai.data.io import write_text_atomic  # lazy: the client is standard library only without --json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
