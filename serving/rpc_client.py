"""RPC client of the recall pipeline: Paddle Serving's ``PipelineClient`` over gRPC.

    python serving/rpc_client.py --hist 5468,30460,10887 --top-k 10
    python serving/rpc_client.py --stdin < requests.jsonl   # one JSON request per line

A request line is ``{"hist_item": [[...], ...], "top_k": 10, "exclude_history": false,
"filter": "..."}``; each answer is one JSON line ``{"err_no", "err_msg", "items", "scores",
"notes", "model_version"}``. From Python: ``RecallRpcClient(endpoint).recall(histories, top_k)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# First: it loads Paddle Serving's pipeline package on Python 3.11 (its _pb2 modules rebuilt).
from paddlerec_milvus import paddle_serving_compat as compat  # noqa: E402
from paddlerec_milvus.pipeline_gateway import request_deadline_s  # noqa: E402
from paddlerec_milvus.serving_pipeline import ERR_BAD_REQUEST, decode_response, encode_request  # noqa: E402

DEFAULT_ENDPOINT = "127.0.0.1:9998"


class RecallRpcClient:
    """One gRPC channel to the pipeline; ``recall`` is safe to call from several threads."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 10.0):
        self.endpoint, self.timeout = endpoint, timeout
        self._client = compat.load_pipeline().PipelineClient()
        self._client.connect([endpoint])

    def recall(self, histories: Sequence[Sequence[int]], top_k: int | None = None,
               exclude_history: bool | None = None, filter: str | None = None) -> dict[str, Any]:
        """Recall for one or more users; returns the decoded response (check ``err_no``)."""
        return self.call(encode_request(histories, top_k, exclude_history, filter))

    def call(self, fields: dict[str, str]) -> dict[str, Any]:
        """Send raw request fields (strings); raises ConnectionError if the server is not there.
        A request over the server's size limit answers err_no 51; one with no answer within its
        ``timeout_ms`` (or the client's ``timeout``) answers err_no 54."""
        import grpc

        feed = dict(fields, clientip="127.0.0.1")  # else it resolves the host name per call
        # PipelineClient.predict sends its call without a gRPC deadline, so a server could run a
        # call its client gave up on long ago. Its own packing, sent with one: the pipeline then
        # drops a call that waited past it in the server's queues (err_no 54, "not run").
        req = self._client._pack_request_package(feed, False, False, False)
        own = request_deadline_s(req)
        deadline = self.timeout if own is None else min(own, self.timeout)
        try:
            resp = self._client._stub.inference(req, timeout=deadline)
        except grpc.RpcError as exc:
            if compat.is_concurrency_refusal(exc.code(), exc.details()):  # every server thread busy
                return {"err_no": compat.ERR_OVERLOADED, "err_msg": "overloaded: every gRPC thread of "
                                                                  "the pipeline is busy; retry shortly"}
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # over the server's max_body_bytes
                return {"err_no": ERR_BAD_REQUEST, "err_msg": f"bad request: too large for the server: "
                                                              f"{exc.details()}"}
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                whose = "the request's timeout_ms" if deadline == own else "the client's timeout"
                return {"err_no": compat.ERR_OVERLOADED, "err_msg": f"deadline exceeded: no answer "
                        f"within {deadline * 1e3:g} ms ({whose}); retry shortly"}
            raise ConnectionError(f"recall pipeline at {self.endpoint}: {exc.code().name} "
                                  f"{exc.details()}") from None
        return decode_response(resp.err_no, resp.err_msg, list(resp.key), list(resp.value))


def recall_rpc(endpoint: str, histories: Sequence[Sequence[int]], top_k: int | None = None,
               exclude_history: bool | None = None, filter: str | None = None,
               timeout: float = 10.0) -> dict[str, Any]:
    """One-shot call (opens a channel each time; keep a RecallRpcClient for many calls)."""
    return RecallRpcClient(endpoint, timeout).recall(histories, top_k, exclude_history, filter)


def request_fields(req: dict[str, Any]) -> dict[str, str]:
    """A JSON request object -> pipeline fields. Values are JSON-encoded as they are, so a wrong
    type reaches the server and gets its error message; ``{"raw": {key: string}}`` sends the
    strings verbatim (to try malformed values)."""
    if isinstance(req.get("raw"), dict):
        return {str(k): str(v) for k, v in req["raw"].items()}
    return {k: v if isinstance(v, str) and k == "filter" else json.dumps(v) for k, v in req.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="host:rpc_port")
    p.add_argument("--hist", action="append", default=[],
                   help="one user's history, comma-separated raw item ids (repeat for more users)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--exclude-history", action="store_true")
    p.add_argument("--filter", default=None, help="Milvus boolean expression on scalar fields")
    p.add_argument("--stdin", action="store_true", help="JSON request per line on stdin, answer per line")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    client = RecallRpcClient(args.endpoint, args.timeout)
    if args.stdin:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                answer = client.call(request_fields(json.loads(line)))
            except (ValueError, AttributeError) as exc:
                answer = {"err_no": -1, "err_msg": f"client: bad request line: {exc}"}
            except ConnectionError as exc:
                answer = {"err_no": -1, "err_msg": str(exc)}
            print(json.dumps(answer), flush=True)
        return 0
    if not args.hist:
        p.error("give --hist (or --stdin)")
    try:
        histories = [[int(x) for x in h.split(",") if x.strip()] for h in args.hist]
    except ValueError as exc:
        p.error(f"--hist: {exc}")
    try:
        answer = client.recall(histories, args.top_k, args.exclude_history or None, args.filter)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(answer, indent=1))
    return 0 if answer["err_no"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
