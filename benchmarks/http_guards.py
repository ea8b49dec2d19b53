"""What petah's front-door guards cost, and what they stop: plain uvicorn vs ``petah.http_server``.

    python benchmarks/http_guards.py > benchmarks/results/http-guards-2026-12-06.json

1. Cost: a bare FastAPI ``/healthz`` served by plain uvicorn (h11, ``limit_concurrency`` as the
   station used to set it) and by ``petah.http_server.guarded_server``, side by side in one
   process; requests per second over a keep-alive connection and with a new connection per
   request, interleaved, medians of 7 runs of 400 requests.
2. What they stop: 1,000 idle sockets and 50 clients that never finish their headers against each
   server, then one ``/healthz``: its status and time (plain uvicorn answers 503 until the sockets
   close; the guarded server answers, and closes the slow ones at its header deadline of 2 s).
"""

import http.client
import json
import resource
import socket
import statistics
import sys
import threading
import time

import uvicorn
from fastapi import FastAPI

from petah.http import listen
from petah.http_server import guarded_server

LIMIT = 4 * 64 + 16  # the station's old limit_concurrency at its default --queue-size


def app() -> FastAPI:
    served = FastAPI()

    @served.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return served


def start(server: uvicorn.Server) -> int:
    sock = listen("127.0.0.1", 0)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return sock.getsockname()[1]


def requests_per_second(port: int, count: int, fresh: bool) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    started = time.perf_counter()
    for _ in range(count):
        if fresh:
            conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        if fresh:
            conn.close()
    return count / (time.perf_counter() - started)


def under_attack(port: int) -> dict:
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(1000)]
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    for sock in slow:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    time.sleep(0.5)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    started = time.perf_counter()
    conn.request("GET", "/healthz")
    status = conn.getresponse().status
    answered = time.perf_counter() - started
    time.sleep(3)
    closed = 0
    for sock in slow:
        sock.settimeout(0.2)
        try:
            closed += sock.recv(16) == b""
        except TimeoutError:
            pass
    for sock in idle + slow:
        sock.close()
    return {"healthz_status": status, "healthz_ms": round(1000 * answered, 2), "slow_clients_closed_after_3_s": closed}


def main() -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    ports = {"plain uvicorn": start(uvicorn.Server(uvicorn.Config(app(), log_level="critical",
                                                                  limit_concurrency=LIMIT))),
             "petah guarded": start(guarded_server(app(), max_requests=LIMIT, header_timeout_s=2,
                                                   log_level="critical"))}
    result = {}
    for fresh, label in ((False, "keep_alive"), (True, "new_connection_per_request")):
        samples = {name: [] for name in ports}
        for _ in range(7):
            for name, port in ports.items():
                samples[name].append(requests_per_second(port, 400, fresh))
        medians = {name: round(statistics.median(values)) for name, values in samples.items()}
        result[label] = {"requests_per_second": medians,
                         "guarded_vs_plain": round(medians["petah guarded"] / medians["plain uvicorn"], 3)}
    result["under_attack"] = {name: under_attack(port) for name, port in ports.items()}
    return result


if __name__ == "__main__":
    json.dump(main(), sys.stdout, indent=1)
    sys.stdout.write("\n")
