#!/usr/bin/env python3
"""Memory per idle client connection: shardgate vs nginx vs HAProxy, side by side.

Each proxy runs compare.py's job (one worker, pooled upstreams) with its
connection limits raised to take N clients. For each proxy in turn:

  1. warm it up (a few hundred keyed requests over one connection), wait
     for it to settle, and read its RSS: the baseline;
  2. open N connections that send nothing yet ("fresh"), read RSS;
  3. send one keyed keep-alive request on each (64 at a time), read every
     response, and leave all N idle on keep-alive ("idle"), read RSS;
  4. close them all, wait for the allocator to give memory back (up to
     --settle seconds, polling), and read RSS again ("after close").

RSS is VmRSS summed over the proxy's processes (/proc/PID/status). Per
connection is (RSS at the step - baseline) / N. The client is this script:
plain non-blocking sockets, so it costs the proxies nothing but the sockets.

With --baseline PATH another shardgate build runs as "baseline", for a
before/after in one run.

Usage: python3 benches/idle.py [--connections 10000] [--binary target/pgo/shardgate]
                               [--baseline OLD] [--only shardgate nginx]
Needs: nginx, haproxy; a release build. Raises this process's descriptor
limit to its hard limit (needs N + a few hundred; HAProxy needs 2N + 114).
Talks only to 127.0.0.1; stops everything it starts by PID.
"""

import argparse
import os
import resource
import selectors
import socket
import sys
import time

from benchlib import ROOT
from compare import Bench, children

BATCH = 64
REQUEST = b"GET /kv/idle HTTP/1.1\r\nHost: bench\r\nx-shard-key: user:%d\r\n\r\n"


def rss_kib(pid):
    total = 0
    for p in [pid] + children(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def settled_rss(pid, seconds, target=None):
    """RSS once it has not moved by more than 0.2 % for 12 s (or has reached
    `target`), polled for up to `seconds`: allocators give memory back over
    seconds (jemalloc's default decay spreads it over 10 s, starting a few
    seconds after the free), and shardgate parks an idle busy connection after one."""
    deadline = time.monotonic() + seconds
    history = [rss_kib(pid)]
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_kib(pid)
        history.append(now)
        if target is not None and now <= target:
            return now
        window = history[-25:]
        if target is None and len(window) == 25 and max(window) - min(window) <= max(64, now // 500):
            return now
    return history[-1]


def connect_all(port, n):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
    return socks


def request_all(socks):
    """One keep-alive request on every socket; returns once each has its whole response."""
    sel = selectors.DefaultSelector()
    pending = {}
    for i, s in enumerate(socks):
        s.sendall(REQUEST % i)
        sel.register(s, selectors.EVENT_READ)
        pending[s] = b""
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            s = key.fileobj
            data = s.recv(65536)
            if not data:
                raise RuntimeError("a proxy closed an idle-test connection mid-response")
            buf = pending[s] + data
            head, sep, body = buf.partition(b"\r\n\r\n")
            if not sep:
                pending[s] = buf
                continue
            length = next(
                (int(l.split(b":", 1)[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")),
                None,
            )
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer: {head[:80]!r}")
            if length is None or len(body) >= length:
                sel.unregister(s)
                del pending[s]
            else:
                pending[s] = buf
    sel.close()
    if pending:
        raise RuntimeError(f"{len(pending)} responses missing after 120 s")


def measure(name, pid, port, n, settle):
    warm = connect_all(port, 1)
    for _ in range(300):
        request_all(warm)
    warm[0].close()
    base = settled_rss(pid, 60)
    socks = connect_all(port, n)
    fresh = settled_rss(pid, 20)
    # In batches, as clients arrive in life: the figure is what an idle
    # connection keeps, not the peak of N requests in flight at once.
    for i in range(0, n, BATCH):
        request_all(socks[i:i + BATCH])
    idle = settled_rss(pid, 60)
    for s in socks:
        s.close()
    after = settled_rss(pid, settle, target=base * 1.10)
    return {
        "name": name,
        "base": base,
        "fresh": (fresh - base) * 1024 / n,
        "idle": (idle - base) * 1024 / n,
        "idle_total": idle,
        "after": after,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/shardgate"))
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--settle", type=float, default=60, help="seconds to wait for memory back after close")
    args = ap.parse_args()
    n = args.connections
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < n + 200:
        sys.exit(f"descriptor limit {hard} too low for {n} connections")

    bench = Bench("shardgate-idle-", args.binary, args.baseline)
    work = bench.work
    # Room for n clients, and no proxy closes them while the run waits for
    # memory to settle (minutes at most).
    os.environ["SHARDGATE_BENCH_EXTRA"] = (
        f"[limits]\nmax_connections = {n + 1000}\nheader_read_timeout = \"300s\"\nidle_timeout = \"300s\"\n"
    )
    upstream_argv, proxies = bench.job()
    # Room for n clients in every proxy; the job's own limits are sized for load tests.
    for conf in ("nginx.conf", "upstream.conf"):
        path = os.path.join(work, conf)
        text = open(path).read().replace(
            "events { worker_connections 8192; }",
            f"worker_rlimit_nofile {2 * n + 1000};\nevents {{ worker_connections {2 * n + 500}; }}",
        ).replace("access_log off;", "access_log off;\n  keepalive_timeout 300s;\n  client_header_timeout 300s;")
        open(path, "w").write(text)
    hap = os.path.join(work, "haproxy.cfg")
    # HAProxy refuses to start unless the descriptor limit covers two per
    # connection (client and server side) plus its own: under a hard limit
    # of 20,000, run with --connections 9900.
    text = open(hap).read().replace("maxconn 4096", f"maxconn {n + 50}\n  ulimit-n {hard}").replace(
        "timeout client 30s",
        "timeout client 300s\n  timeout http-request 300s\n  timeout http-keep-alive 300s")
    open(hap, "w").write(text)

    def one(name, pid, port):
        r = measure(name, pid, port, n, args.settle)
        print(f"{name}: base {r['base']} KiB, idle {r['idle']:.0f} B/conn, after close {r['after']} KiB",
              file=sys.stderr)
        return r

    rows = bench.each_proxy(upstream_argv, proxies, args.only, one)

    print(f"\nRSS per client connection ({n:,} connections, one worker each)\n")
    print("| proxy | baseline RSS | per fresh connection | per idle keep-alive connection "
          "| RSS with all idle | RSS after close | after close vs baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['base'] / 1024:.1f} MiB | {r['fresh']:,.0f} B | {r['idle']:,.0f} B "
              f"| {r['idle_total'] / 1024:.1f} MiB | {r['after'] / 1024:.1f} MiB "
              f"| {100 * (r['after'] - r['base']) / r['base']:+.0f} % |")


if __name__ == "__main__":
    main()
