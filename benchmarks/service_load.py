"""Load check of the config service: concurrent clients on loopback for a bounded time.

Starts `bioconf serve` in its own process and drives it with wrk (Debian's `wrk`, a Lua script for
the POST body and the status check) for a fixed time per scenario; prints requests/s, p50/p99
latency and the requests that failed (a wrong status, a socket error or a timeout). Aim: at least
2,000 validations/s with p99 under 50 ms on a 2-core machine.

Why wrk: client and server share the machine's 2 cores, so every cycle the load generator spends is
taken from the server. wrk is compiled C on one event-loop thread; a Python asyncio client would
need about as much CPU per request as the server itself and would measure mostly itself.

    .venv/bin/python benchmarks/service_load.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _table import print_table

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pretrain_esm2_small.json"

# wrk's Lua side: one prepared request, a per-thread count of unexpected statuses, a JSON summary.
SCRIPT = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  expected = tonumber(args[1])
  unexpected = 0
  if args[2] then
    local file = io.open(args[2], "rb")
    wrk.method = "POST"
    wrk.body = file:read("*a")
    wrk.headers["Content-Type"] = args[3]
    file:close()
  end
  prepared = wrk.format()
end
function request() return prepared end
function response(status, headers, body)
  if status ~= expected then unexpected = unexpected + 1 end
end
function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do bad = bad + thread:get("unexpected") end
  local e = summary.errors
  io.write(string.format('{"requests": %d, "seconds": %f, "p50_us": %d, "p99_us": %d, "max_us": %d, '
    .. '"failed": %d}\\n', summary.requests, summary.duration / 1e6, latency:percentile(50),
    latency:percentile(99), latency.max, bad + e.connect + e.read + e.write + e.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run_wrk(url: str, seconds: float, connections: int, script: Path, args: list[str]) -> dict:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "2s", "-s", str(script), url]
    result = subprocess.run([*command, "--", *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="duration of each scenario (default 10)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "bioconf", "serve", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows = []
    try:
        wait_until_up(f"{base}/healthz")
        with tempfile.TemporaryDirectory() as scratch:
            script = Path(scratch) / "load.lua"
            script.write_text(SCRIPT)
            # What a form produces: a wrong type and a broken megatron rule. (An unknown key costs ~0.4 ms
            # more: the schema layer's "did you mean" runs difflib over every field name.)
            invalid = Path(scratch) / "invalid.json"
            invalid.write_text(
                json.dumps(
                    {**json.loads(EXAMPLE.read_text()), "num_layers": 3.7, "tensor_model_parallel_size": 3}
                )
            )
            valid = ["200", str(EXAMPLE), "application/json"]
            scenarios = [  # (what, connections, path, the Lua script's arguments)
                ("GET /healthz (floor: the HTTP stack alone)", 16, "/healthz", ["200"]),
                ("POST /v1/validate, valid config -> 200", 16, "/v1/validate", valid),
                ("POST /v1/validate, valid config -> 200", 64, "/v1/validate", valid),
                (
                    "POST /v1/validate, invalid config (type, rule) -> 422",
                    16,
                    "/v1/validate",
                    ["422", str(invalid), "application/json"],
                ),
            ]
            run_wrk(f"{base}/v1/validate", 2, 16, script, valid)  # warm-up
            for name, connections, path, wrk_args in scenarios:
                stats = run_wrk(base + path, args.seconds, connections, script, wrk_args)
                rows.append(
                    [
                        name,
                        connections,
                        f"{stats['requests'] / stats['seconds']:,.0f}",
                        f"{stats['p50_us'] / 1000:.2f}",
                        f"{stats['p99_us'] / 1000:.2f}",
                        f"{stats['requests']:,}",
                        stats["failed"],
                    ]
                )
    finally:
        server.terminate()
        server.wait(timeout=10)
    print_table(
        f"bioconf serve under load: wrk (1 thread) on loopback, {args.seconds} s a row, on the same 2 cores "
        "as the server",
        ["scenario", "connections", "requests/s", "p50 ms", "p99 ms", "requests", "failed"],
        rows,
    )
    return 1 if any(row[-1] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
