"""Every documented serving command from a venv made by `make install` alone (no dev packages).

`.ci/run` builds that venv (`make install VENV=.venv-runtime`) and points
PADDLEREC_MILVUS_RUNTIME_VENV at it; elsewhere the test is skipped unless the variable is set.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _venv() -> str:
    venv = os.environ.get("PADDLEREC_MILVUS_RUNTIME_VENV")
    if not venv:
        if os.environ.get("CI"):
            pytest.fail("CI must set PADDLEREC_MILVUS_RUNTIME_VENV (see .ci/run)")
        pytest.skip("set PADDLEREC_MILVUS_RUNTIME_VENV to a venv made by `make install`")
    return os.path.abspath(venv)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(proc: subprocess.Popen, log: str, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"did not start:\n{open(log).read()[-3000:]}")


def test_serve_clients_api_and_export_run_without_dev_packages(trained_demo, tmp_path):
    venv = _venv()
    py, cli = os.path.join(venv, "bin", "python"), os.path.join(venv, "bin", "paddlerec-milvus")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = subprocess.run([py, "-c", "import pytest"], capture_output=True, env=env)
    assert probe.returncode != 0, "the runtime venv has pytest: it does not prove anything"

    export_dir, uri = str(tmp_path / "export"), str(tmp_path / "serving.db")
    p = subprocess.run([cli, "export", "-m", trained_demo["config_path"], "-o", *trained_demo["overrides"],
                        f"milvus.uri={uri}", "--collection", "rt_serving", "--output", export_dir],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(export_dir, "item_map.tsv")) as f:
        next(f)
        hist = ",".join(line.split("\t")[1].strip() for _, line in zip(range(5), f))

    rpc, http = _port(), _port()
    conf = tmp_path / "config.yml"
    conf.write_text(json.dumps({"rpc_port": rpc, "http_port": http, "log_dir": str(tmp_path / "logs"),
                                "recall": {"export_dir": export_dir}}))
    log = str(tmp_path / "serve.log")
    with open(log, "w") as out:
        serve = subprocess.Popen([cli, "serve", "-c", str(conf)], cwd=tmp_path, stdout=out,
                                 stderr=subprocess.STDOUT, env=env)
    try:
        _wait(serve, log, lambda: "recall pipeline ready" in open(log).read())
        for client, arg in (("rpc_client.py", ["--endpoint", f"127.0.0.1:{rpc}"]),
                            ("http_client.py", ["--url", f"http://127.0.0.1:{http}/recall/prediction"])):
            c = subprocess.run([py, os.path.join(REPO, "serving", client), *arg, "--hist", hist,
                                "--top-k", "5"], capture_output=True, text=True, env=env, timeout=120)
            assert c.returncode == 0, (client, c.stdout[-2000:], c.stderr[-2000:])
            answer = json.loads(c.stdout[c.stdout.index("{"):])
            assert answer["err_no"] == 0 and len(answer["items"][0]) == 5, answer
    finally:
        serve.terminate()
        serve.wait(60)
    assert serve.returncode == 0, open(log).read()[-3000:]

    port = _port()
    log = str(tmp_path / "api.log")
    with open(log, "w") as out:
        api = subprocess.Popen([cli, "api", "--port", str(port), "--export-dir", export_dir],
                               cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                               env={**env, "PADDLEREC_MILVUS_TITLES": ""})

    def api_ready() -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait(api, log, api_ready)
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{port}/rec/recall", method="POST",
                                     data=json.dumps({"top_k": 5, "hist_item": [[int(x) for x in
                                                                                 hist.split(",")]]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert len(json.loads(r.read())["items"][0]) == 5
    finally:
        api.terminate()
        api.wait(60)
