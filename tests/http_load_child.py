"""A load generator in its own process (tests must not load a service from threads of the test
process): ``python tests/http_load_child.py URL CONCURRENCY PER_CLIENT`` reads a JSON list of
request bodies on stdin, sends them round-robin from CONCURRENCY keep-alive connections, and
prints one JSON list of [body index, status, Retry-After, reply JSON, Connection header] on stdout."""

from __future__ import annotations

import http.client
import json
import sys
import threading
import urllib.parse


def main() -> int:
    url, concurrency, per_client = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    bodies = [json.dumps(b) for b in json.load(sys.stdin)]
    parts = urllib.parse.urlsplit(url)
    out: list[list[object]] = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        start.wait()
        for n in range(per_client):
            i = (k + n * concurrency) % len(bodies)
            conn.request("POST", parts.path, bodies[i], {"Content-Type": "application/json"})
            reply = conn.getresponse()
            data = reply.read()
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = data.decode(errors="replace")
            with lock:
                out.append([i, reply.status, reply.getheader("Retry-After"), parsed,
                            reply.getheader("Connection")])
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
