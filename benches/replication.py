#!/usr/bin/env python3
"""The reference node's replication, measured with the real binaries on
127.0.0.1: a coordinator, one partition of three `shardgate node`s and a proxy.

1. Replicated writes per second: h2load POSTs (16-byte values, 16 keep-alive
   connections, one key per connection) straight to the primary, with
   `--write-quorum majority` (acknowledged once 2 of 3 applied the write) and
   `async` (acknowledged after the local apply).
2. Write-then-read latency through the proxy, sequential on one keep-alive
   connection: PUT, then GET the same key either from the primary
   (`x-read-preference: primary`) or with the write's token
   (`secondaryPreferred` + `x-shardgate-token`), which a replica may serve.

Usage: python3 benches/replication.py [--writes 20000] [--pairs 2000]
                                      [--binary target/release/shardgate]
Needs: nghttp2-client (h2load). Stops everything it starts by PID.
"""

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import ROOT, free_port, stop_all, wait_port, write_topology


class Cluster:
    """A coordinator, three nodes (the first is primary) and a proxy."""

    def __init__(self, binary, quorum):
        self.dir = tempfile.mkdtemp(prefix="shardgate-replication-")
        self.procs = []
        chttp, cgrpc = free_port(), free_port()
        self.nodes = [free_port() for _ in range(3)]
        topo = write_topology(os.path.join(self.dir, "map.json"), [self.nodes])
        self.coordinator = f"127.0.0.1:{chttp}"
        self.spawn("coordinator", [binary, "coordinator", "--http-listen", self.coordinator,
                                   "--grpc-listen", f"127.0.0.1:{cgrpc}", "--topology", topo,
                                   "--store", f"file:{self.dir}/state.json",
                                   "--heartbeat-timeout", "2", "--sweep-interval", "0.2"])
        wait_port(chttp)
        for i, port in enumerate(self.nodes):
            self.spawn(f"n{i}", [binary, "node", "--id", f"n{i}", "--listen", f"127.0.0.1:{port}",
                                 "--coordinator", f"127.0.0.1:{cgrpc}", "--write-quorum", quorum,
                                 "--max-keys", "1000000", "--max-bytes", str(1 << 30)])
            wait_port(port)
        pport, aport = free_port(), free_port()
        cfg = os.path.join(self.dir, "proxy.toml")
        with open(cfg, "w") as f:
            f.write(f'[server]\nlisten = "127.0.0.1:{pport}"\nadmin_listen = "127.0.0.1:{aport}"\n'
                    f'[topology]\nsources = ["http://{self.coordinator}"]\n[log]\nlevel = "warn"\n')
        self.spawn("proxy", [binary, "proxy", "--config", cfg])
        wait_port(pport)
        self.proxy = pport
        self.wait_in_sync()

    def spawn(self, name, argv):
        log = open(os.path.join(self.dir, f"{name}.log"), "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log))

    def status(self, port):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/_shardgate/status")
        return json.loads(c.getresponse().read())

    def wait_in_sync(self):
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                s = [self.status(p) for p in self.nodes]
                if s[0]["role"] == "primary" and all(x["state"] == "IN_SYNC" for x in s[1:]):
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"replication did not start; logs in {self.dir}")

    def stop(self):
        stop_all(self.procs, self.dir)


def writes_per_second(port, n, work):
    body = os.path.join(work, "value")
    with open(body, "w") as f:
        f.write("0123456789abcdef")
    out = subprocess.run(
        ["h2load", "--h1", "-n", str(n), "-c", "16", "-t", "1", "-d", body,
         f"http://127.0.0.1:{port}/kv/bench"],
        capture_output=True, text=True, timeout=600,
    ).stdout
    if f"{n} succeeded" not in out or f"status codes: {n} 2xx" not in out:
        raise RuntimeError(f"writes failed:\n{out}")
    return float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))


def pairs(port, n, with_token):
    """Sequential PUT-then-GET pairs; the GET's latencies (µs) and who served it."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    reads, by_replica = [], 0
    for i in range(n):
        key = f"/kv/pair-{i % 64}"
        c.request("PUT", key, body=f"v{i}")
        r = c.getresponse()
        r.read()
        token = r.getheader("x-shardgate-token")
        headers = ({"x-read-preference": "secondaryPreferred", "x-shardgate-token": token}
                   if with_token else {"x-read-preference": "primary"})
        t0 = time.perf_counter()
        c.request("GET", key, headers=headers)
        g = c.getresponse()
        body = json.loads(g.read())
        reads.append((time.perf_counter() - t0) * 1e6)
        if body.get("value") != f"v{i}":
            raise RuntimeError(f"pair {i} read {body}")
        if body.get("node") != "n0":
            by_replica += 1
    return reads, by_replica


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/shardgate"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="shardgate-replication-bench-")
    rates, latency = {}, {}
    for quorum in ("majority", "async"):
        c = Cluster(args.binary, quorum)
        try:
            rates[quorum] = writes_per_second(c.nodes[0], args.writes, work)
            print(f"{quorum}: {rates[quorum]:,.0f} writes/s", file=sys.stderr)
            if quorum == "majority":
                for name, token in (("primary read", False), ("token read", True)):
                    reads, by_replica = pairs(c.proxy, args.pairs, token)
                    latency[name] = (statistics.median(reads), pct(reads, 0.99), by_replica)
        finally:
            c.stop()
    print(f"\nreference node, one partition of three on loopback, {args.writes:,} POSTs of 16 bytes "
          f"straight to the primary (h2load, 16 keep-alive connections)\n")
    print("| write quorum | replicated writes/s |")
    print("|---|---:|")
    for q, r in rates.items():
        print(f"| {q} | {r:,.0f} |")
    print(f"\nwrite-then-read through the proxy, {args.pairs:,} sequential pairs on one connection "
          f"(majority writes): the read's latency\n")
    print("| read | p50 | p99 | served by a replica |")
    print("|---|---:|---:|---:|")
    for name, (p50, p99, by_replica) in latency.items():
        print(f"| {name} | {p50:.0f} µs | {p99:.0f} µs | {by_replica} of {args.pairs} |")


if __name__ == "__main__":
    main()
