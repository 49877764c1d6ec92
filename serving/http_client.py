"""HTTP client of the recall pipeline (its HTTP gateway speaks JSON; no Paddle Serving needed).

    python serving/http_client.py --hist 5468,30460,10887 --top-k 10
    curl -s -X POST http://127.0.0.1:18082/recall/prediction \\
         -d '{"key": ["hist_item", "top_k"], "value": ["[[5468, 30460, 10887]]", "10"]}'

From Python: ``recall_http(url, histories, top_k)`` -> ``{"err_no", "err_msg", "items", "scores",
"notes", "model_version"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from paddlerec_milvus.serving_pipeline import decode_response, encode_request  # noqa: E402

DEFAULT_URL = "http://127.0.0.1:18082/recall/prediction"


def post_fields(url: str, fields: dict[str, str], timeout: float = 10.0,
                session: requests.Session | None = None) -> dict[str, Any]:
    """POST raw request fields; a gateway error (e.g. a body that is too big) comes back with
    its ``err_no`` (see ``decode_http``). Raises ConnectionError if nothing answers."""
    body = {"key": list(fields), "value": list(fields.values())}
    try:
        r = (session or requests).post(url, json=body, timeout=timeout)
    except requests.RequestException as exc:
        raise ConnectionError(f"recall pipeline at {url}: {exc}") from None
    return decode_http(r.status_code, r.text)


def decode_http(status: int, text: str) -> dict[str, Any]:
    """An HTTP answer -> the response dict. The gateway's own errors (400 bad JSON or shape, 413
    too big, 404/405, 503 no gRPC server...) carry ``{"err_no", "err_msg"}`` (51 for the
    request's fault, 53 for the server's): they come back as they are; other non-200 answers
    (Paddle Serving's Go gateway: ``{"code", "message"}``) as ``err_no`` = the HTTP status."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if status != 200 and isinstance(data, dict) and isinstance(data.get("err_no"), int):
        return {"err_no": data["err_no"], "err_msg": str(data.get("err_msg") or f"HTTP {status}")}
    if status != 200 or not isinstance(data, dict) or "message" in data and "err_no" not in data:
        message = data.get("message") if isinstance(data, dict) else text[:200]
        return {"err_no": status if status != 200 else -1, "err_msg": f"HTTP {status}: {message}"}
    return decode_response(data.get("err_no", 0), data.get("err_msg", ""), data.get("key") or [],
                           data.get("value") or [])


def recall_http(url: str, histories: Sequence[Sequence[int]], top_k: int | None = None,
                exclude_history: bool | None = None, filter: str | None = None, timeout: float = 10.0,
                session: requests.Session | None = None) -> dict[str, Any]:
    """Recall for one or more users over HTTP; check ``err_no`` in the answer."""
    return post_fields(url, encode_request(histories, top_k, exclude_history, filter), timeout, session)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--hist", action="append", required=True,
                   help="one user's history, comma-separated raw item ids (repeat for more users)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--exclude-history", action="store_true")
    p.add_argument("--filter", default=None)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    try:
        histories = [[int(x) for x in h.split(",") if x.strip()] for h in args.hist]
    except ValueError as exc:
        p.error(f"--hist: {exc}")
    try:
        answer = recall_http(args.url, histories, args.top_k, args.exclude_history or None, args.filter,
                             args.timeout)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(answer, indent=1))
    return 0 if answer["err_no"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
