#!/usr/bin/env python3
"""Open N keep-alive HTTP/1.1 connections to 127.0.0.1:PORT, complete one GET on each,
then hold them all open and idle; used by bench.py to measure a proxy's memory per
idle client connection.

Protocol with bench.py (one JSON object per line on stdout):
  1. after every connection has had its response: {"ok": served, "opened": n, "error": ...}
  2. then waits for any line on stdin (or EOF, or --hold seconds), checks which
     connections the proxy has closed meanwhile: {"still_open": m}; then exits,
     closing everything.
"""

import argparse
import asyncio
import json
import os
import resource
import sys

CONCURRENCY = 64  # connections being set up at once: keeps the proxy's upstream pool small


async def one(port: int, path: str, sem: asyncio.Semaphore, timeout: float):
    """Connect, send one GET, read the whole response; return the open stream pair."""
    async with sem:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        w.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        lines = head.decode("latin-1").lower().split("\r\n")
        length = next((int(l.split(":", 1)[1]) for l in lines if l.startswith("content-length:")),
                      None)
        if length is not None:
            await asyncio.wait_for(r.readexactly(length), timeout)
        elif any(l.startswith("transfer-encoding:") and "chunked" in l for l in lines):
            await asyncio.wait_for(r.readuntil(b"0\r\n\r\n"), timeout)
        if not 200 <= status < 300:
            raise RuntimeError(f"status {status}")
        return r, w


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/")
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--timeout", type=float, default=10.0, help="per connection step")
    ap.add_argument("--hold", type=float, default=120.0, help="longest wait for bench.py")
    a = ap.parse_args()

    # Room for n sockets (bench.py raises the hard limit; take all of it).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    sem = asyncio.Semaphore(CONCURRENCY)
    results = await asyncio.gather(*(one(a.port, a.path, sem, a.timeout) for _ in range(a.n)),
                                   return_exceptions=True)
    conns = [x for x in results if not isinstance(x, BaseException)]
    errors = [x for x in results if isinstance(x, BaseException)]
    print(json.dumps({"ok": len(conns), "opened": a.n,
                      "error": repr(errors[0]) if errors else None}), flush=True)

    # Hold until bench.py has read the proxy's memory (any line, EOF, or --hold seconds).
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), a.hold)
    except asyncio.TimeoutError:
        pass
    # A connection the proxy closed has seen EOF (the event loop kept reading it).
    await asyncio.sleep(0)
    still = sum(1 for r, _ in conns if not r.at_eof() and r.exception() is None)
    print(json.dumps({"still_open": still}), flush=True)
    # Exit at once: the kernel closes every socket, and a stdin reader thread still
    # blocked (after a --hold timeout) must not keep the process alive.
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
