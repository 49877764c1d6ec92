"""Serving overhead: the Paddle Serving pipeline (RPC and HTTP) against the same recall in-process.

    python benchmarks/bench_serving.py --quick [--out docs/bench_serving.json]
    python benchmarks/bench_serving.py --export-dir output/export [--milvus-uri ...]

Single-user requests (top_k 50) at concurrency 1, 4 and 16: latency p50/p99 and throughput, for
``RecallService.recall`` called in-process (threads sharing one service, as the pipeline's Ops do)
and for the pipeline over RPC (``PipelineClient``) and HTTP (its JSON gateway). Ratio = serving
figure / in-process figure, i.e. the cost of the serving layer. Without ``--export-dir`` it trains
the small demo model (a few seconds) and exports it into a fresh Milvus Lite file.

The in-process figures are measured in a child process, twice: with protobuf's default (upb)
backend and with the pure-Python one, which the server process must use for Paddle Serving 0.9
(and which therefore also slows its Milvus client). Client and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "serving"))
# First: Paddle Serving's RPC client needs protobuf's pure-Python backend in this process.
from benchmarks.common import cpu_model, percentiles  # noqa: E402
from paddlerec_milvus import paddle_serving_compat  # noqa: E402,F401

CONCURRENCY = (1, 4, 16)
TOP_K = 50
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def histories_for(export_dir: str, n: int = 64, seed: int = 7) -> list[list[int]]:
    """``n`` single-user histories of 5..20 known raw ids (seeded), from the export's item map."""
    import numpy as np

    raw = []
    with open(os.path.join(export_dir, "item_map.tsv")) as f:
        next(f)
        raw = [int(line.split("\t")[1]) for line in f]
    rng = np.random.default_rng(seed)
    return [rng.choice(raw, size=int(rng.integers(5, 21)), replace=False).tolist() for _ in range(n)]


def load(call: Callable[[list[int]], Any], hists: list[list[int]], concurrency: int, total: int,
         check: Callable[[Any], bool]) -> dict[str, float]:
    """``total`` calls from ``concurrency`` threads; per-call latency and overall throughput."""
    per_thread = max(1, total // concurrency)
    lat: list[float] = []
    errors: list[Any] = []
    start = threading.Barrier(concurrency + 1)

    def worker(k: int) -> None:
        mine = []
        start.wait()
        for n in range(per_thread):
            h = hists[(k * per_thread + n) % len(hists)]
            t0 = time.perf_counter()
            answer = call(h)
            mine.append((time.perf_counter() - t0) * 1000)
            if not check(answer):
                errors.append(answer)
        lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} failed calls, e.g. {str(errors[0])[:300]}")
    p50, p99 = percentiles(lat)
    return {"p50_ms": p50, "p99_ms": p99, "throughput_rps": len(lat) / wall, "requests": len(lat)}


# -- in-process (child process) ---------------------------------------------------------------
def inprocess_worker(args: argparse.Namespace) -> int:
    """Child: RecallService.recall in threads; prints one JSON object."""
    from google.protobuf.internal import api_implementation

    from paddlerec_milvus.service import RecallService

    svc = RecallService(args.export_dir, milvus_uri=args.milvus_uri or None,
                        collection=args.collection or None)
    hists = histories_for(args.export_dir)
    for h in hists[:20]:  # warm-up: predictor clones, Milvus connection
        svc.recall([h], TOP_K)
    out: dict[str, Any] = {"protobuf": api_implementation.Type(), "items": svc.index.count(),
                           "uri": svc.uri, "collection": svc.collection, "levels": {}}
    try:
        c = svc.index._client
        idx = c.list_indexes(svc.collection)
        out["index_type"] = c.describe_index(svc.collection, idx[0]).get("index_type") if idx else "?"
    except Exception:  # informative only
        out["index_type"] = "?"
    for conc in args.levels:
        out["levels"][str(conc)] = load(lambda h: svc.recall([h], TOP_K), hists, conc, args.total,
                                        lambda a: len(a.items[0]) == TOP_K)
    svc.close()
    print(json.dumps(out))
    return 0


def run_inprocess(export_dir: str, uri: str, collection: str, total: int, python_protobuf: bool) -> dict:
    env = dict(ENV, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python" if python_protobuf else "upb")
    cmd = [sys.executable, os.path.abspath(__file__), "--inprocess-worker", "--export-dir", export_dir,
           "--milvus-uri", uri or "", "--collection", collection or "", "--total", str(total),
           "--levels", *map(str, CONCURRENCY)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"in-process run failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the pipeline ---------------------------------------------------------------------------
def start_pipeline(work: str, export_dir: str, uri: str, collection: str) -> tuple[subprocess.Popen, dict]:
    from paddlerec_milvus.milvus_server import free_port

    conf = {"host": "127.0.0.1", "rpc_port": free_port(), "http_port": free_port(),
            "worker_num": 16, "log_dir": os.path.join(work, "serving-logs"),
            "op": {"user_tower": {"concurrency": 2}, "recall": {"concurrency": 2}},
            "recall": {"export_dir": export_dir, "milvus_uri": uri or "", "collection": collection or ""}}
    path = os.path.join(work, "serving.yml")
    with open(path, "w") as f:
        json.dump(conf, f)
    log_path = os.path.join(work, "serving.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "paddlerec_milvus.cli", "serve", "-c", path],
                                cwd=work, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with open(log_path) as f:
            text = f.read()
        if "recall pipeline ready" in text:
            return proc, conf
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"pipeline did not start: {text[-2000:]}")


def run_serving(export_dir: str, uri: str, collection: str, total: int, work: str) -> tuple[dict, dict]:
    import requests
    from http_client import recall_http
    from rpc_client import RecallRpcClient

    proc, conf = start_pipeline(work, export_dir, uri, collection)
    try:
        hists = histories_for(export_dir)
        url = f"http://127.0.0.1:{conf['http_port']}/recall/prediction"
        rpc = RecallRpcClient(f"127.0.0.1:{conf['rpc_port']}", timeout=60)
        local = threading.local()

        def http_call(h: list[int]) -> dict:
            s = getattr(local, "s", None)
            if s is None:
                s = local.s = requests.Session()
            return recall_http(url, [h], TOP_K, session=s, timeout=60)

        def rpc_call(h: list[int]) -> dict:
            return rpc.recall([h], TOP_K)

        ok = lambda a: a["err_no"] == 0 and len(a["items"][0]) == TOP_K  # noqa: E731
        out: dict[str, dict] = {"rpc": {}, "http": {}}
        for name, call in (("rpc", rpc_call), ("http", http_call)):
            for h in hists[:20]:
                assert ok(call(h)), call(h)
            for conc in CONCURRENCY:
                out[name][str(conc)] = load(call, hists, conc, total, ok)
        return out, conf
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def demo_export(work: str) -> tuple[str, str, str]:
    """Train the demo model briefly and export it into a fresh Milvus Lite file."""
    import shutil

    model_dir = os.path.join(work, "mind")
    shutil.copytree(os.path.join(REPO, "models", "mind"), model_dir,
                    ignore=shutil.ignore_patterns("output*", "__pycache__", "data_bigdata"))
    cfg = os.path.join(model_dir, "config.yaml")
    over = ["runner.epochs=2", "runner.batches_per_epoch=60"]
    uri, export_dir = os.path.join(work, "bench.db"), os.path.join(work, "export")
    for args in (["train", "-m", cfg, "-o", *over],
                 ["export", "-m", cfg, "-o", *over, f"milvus.uri={uri}", "--collection", "bench_items",
                  "--output", export_dir]):
        proc = subprocess.run([sys.executable, "-m", "paddlerec_milvus.cli", *args], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {proc.stderr[-2000:]}")
    return export_dir, uri, "bench_items"


def machine() -> dict[str, str]:
    import platform

    return {"cores": str(os.cpu_count()), "cpu": cpu_model(), "python": platform.python_version()}


def run(quick: bool = False, export_dir: str | None = None, milvus_uri: str = "", collection: str = "",
        work: str | None = None) -> dict[str, Any]:
    """Measure everything; returns ``{"intro", "rows", "figures", "notes", ...}`` (the report's shape)."""
    from importlib.metadata import version

    total = 160 if quick else 1000
    work = work or tempfile.mkdtemp(prefix="bench_serving_")
    if export_dir is None:
        export_dir, milvus_uri, collection = demo_export(work)
    export_dir = os.path.abspath(export_dir)
    # in-process first, one at a time: a Milvus Lite file opens in one process only
    inproc = {"upb": run_inprocess(export_dir, milvus_uri, collection, total, False),
              "python": run_inprocess(export_dir, milvus_uri, collection, total, True)}
    serving, conf = run_serving(export_dir, milvus_uri, collection, total, work)
    info = inproc["upb"]
    lite = "://" not in info["uri"]
    engine = (f"Milvus Lite {version('milvus-lite')}" if lite else f"Milvus server at {info['uri']}") + \
        f", {info['index_type']} index"
    base = inproc["upb"]["levels"]
    rows, figures = [], {}
    for label, levels in (("in-process (protobuf upb)", inproc["upb"]["levels"]),
                          ("in-process (protobuf python)", inproc["python"]["levels"]),
                          ("pipeline RPC", serving["rpc"]), ("pipeline HTTP", serving["http"])):
        for conc in map(str, CONCURRENCY):
            m = levels[conc]
            rows.append({"path": label, "concurrency": int(conc), "p50 ms": m["p50_ms"],
                         "p99 ms": m["p99_ms"], "req/s": m["throughput_rps"],
                         "p50 ratio": m["p50_ms"] / base[conc]["p50_ms"],
                         "req/s ratio": m["throughput_rps"] / base[conc]["throughput_rps"]})
            key = label.split(" (")[0].replace(" ", "_").replace("-", "_") + \
                ("_pb_python" if "python" in label else "")
            figures[f"serving_{key}_c{conc}_p50_ms"] = m["p50_ms"]
            figures[f"serving_{key}_c{conc}_p99_ms"] = m["p99_ms"]
            figures[f"serving_{key}_c{conc}_rps"] = m["throughput_rps"]
    intro = [f"{info['items']} items in {engine}; single-user requests, top_k {TOP_K}, {total} requests "
             f"per level; pipeline in thread mode, {conf['worker_num']} gRPC threads, Op concurrency "
             f"{conf['op']['user_tower']['concurrency']}+{conf['op']['recall']['concurrency']}; clients "
             "and server share the machine. Ratio = figure / in-process (protobuf upb) figure."]
    return {"intro": intro, "rows": rows, "figures": figures, "items": info["items"], "engine": engine,
            "top_k": TOP_K, "requests_per_level": total, "export_dir": export_dir, "machine": machine(),
            "notes": ["The pipeline's server process runs protobuf's pure-Python backend (Paddle Serving "
                      "0.9's generated code needs it), which also slows its Milvus client: compare "
                      "with the in-process (protobuf python) rows."]}


def print_table(result: dict[str, Any]) -> None:
    print(result["intro"][0])
    head = f"{'path':<30}{'conc':>5}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'p50 x':>8}{'req/s x':>9}"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        print(f"{r['path']:<30}{r['concurrency']:>5}{r['p50 ms']:>9.2f}{r['p99 ms']:>9.2f}{r['req/s']:>9.1f}"
              f"{r['p50 ratio']:>8.2f}{r['req/s ratio']:>9.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="160 requests per level instead of 1000")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "bench_serving.json"))
    p.add_argument("--export-dir", default=None, help="an exported model (default: train + export the demo)")
    p.add_argument("--milvus-uri", default="", help="default: the export's")
    p.add_argument("--collection", default="", help="default: the export's")
    p.add_argument("--inprocess-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--total", type=int, default=160, help=argparse.SUPPRESS)
    p.add_argument("--levels", type=int, nargs="*", default=list(CONCURRENCY), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inprocess_worker:
        return inprocess_worker(args)
    result = run(args.quick, args.export_dir, args.milvus_uri, args.collection)
    result["command"] = "python benchmarks/bench_serving.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    print_table(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
