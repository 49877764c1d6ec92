"""Serving section: the Paddle Serving pipeline (RPC, HTTP) and the REST API, against the same
recall called in-process, at concurrency 1, 4 and 16 (one export, one Milvus Lite file)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from tqdm import tqdm

from paddlerec_milvus.milvus_server import free_port

from . import bench_serving

logger = logging.getLogger(__name__)


def measure_rest(export_dir: str, uri: str, collection: str, total: int) -> dict[str, dict[str, float]]:
    """Start ``uvicorn serving.main:app`` on a free port and load it like the pipeline."""
    import requests

    port = free_port()
    env = dict(bench_serving.ENV, PADDLEREC_MILVUS_EXPORT_DIR=export_dir, PADDLEREC_MILVUS_URI=uri,
               PADDLEREC_MILVUS_COLLECTION=collection)
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "serving.main:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], cwd=bench_serving.REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            raise RuntimeError("REST API did not become healthy")
        hists = bench_serving.histories_for(export_dir)
        session_local: dict[int, requests.Session] = {}

        def call(h: list[int]) -> Any:
            import threading

            s = session_local.setdefault(threading.get_ident(), requests.Session())
            return s.post(base + "/rec/recall", json={"top_k": bench_serving.TOP_K, "hist_item": [h]},
                          timeout=30)

        def ok(r: Any) -> bool:
            return r.status_code == 200 and len(r.json()["items"][0]) == bench_serving.TOP_K

        levels = {}
        for conc in tqdm(bench_serving.CONCURRENCY, desc="REST", unit=" level"):
            levels[str(conc)] = bench_serving.load(call, hists, conc, total, ok)
        return levels
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(quick: bool = False) -> dict[str, Any]:
    """Pipeline (RPC/HTTP) and in-process rows from bench_serving, plus REST rows."""
    work = tempfile.mkdtemp(prefix="bench_serving_")
    export_dir, uri, collection = bench_serving.demo_export(work)
    result = bench_serving.run(quick=quick, export_dir=export_dir, milvus_uri=uri, collection=collection,
                               work=work)
    total = result["requests_per_level"]
    rest = measure_rest(export_dir, uri, collection, total)
    base = {r["concurrency"]: r for r in result["rows"] if r["path"] == "in-process (protobuf upb)"}
    for conc in bench_serving.CONCURRENCY:
        m = rest[str(conc)]
        result["rows"].append({"path": "REST API (uvicorn)", "concurrency": conc, "p50 ms": m["p50_ms"],
                               "p99 ms": m["p99_ms"], "req/s": m["throughput_rps"],
                               "p50 ratio": m["p50_ms"] / base[conc]["p50 ms"],
                               "req/s ratio": m["throughput_rps"] / base[conc]["req/s"]})
        result["figures"][f"serving_rest_c{conc}_p50_ms"] = m["p50_ms"]
        result["figures"][f"serving_rest_c{conc}_p99_ms"] = m["p99_ms"]
        result["figures"][f"serving_rest_c{conc}_rps"] = m["throughput_rps"]
    result["figures"]["serve_rpc_p99_ms"] = result["figures"].get("serving_pipeline_RPC_c1_p99_ms")
    result["intro"].append("REST API rows: `uvicorn serving.main:app` on the same export and Milvus Lite "
                           "file (after the pipeline stopped: Lite opens a file in one process).")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    out = run(quick="--quick" in sys.argv)
    bench_serving.print_table(out)
    print(os.linesep.join(f"{k}: {v}" for k, v in out["figures"].items() if "rest" in k))
