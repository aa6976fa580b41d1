#!/usr/bin/env python3
"""Where each proxy's kernel time goes, per proxied request, same job.

compare.py finds shardgate spending more *system* time per request than nginx
and HAProxy although `perf stat` counts the same syscalls per request. This
looks one level down, for each proxy in turn (the job of compare.py: keyed,
pooled keep-alive forwarding to nginx upstreams; the proxy pinned to CPU 0,
h2load and the upstream to CPU 1, so nothing else is woken onto the proxy's
core), over a fixed number of HTTP/1.1 keep-alive requests:

- the proxy's user and system CPU per request (/proc, as compare.py takes it);
- TCP segments and IP bytes per request on loopback (`nstat`: the whole
  machine, so the load generator and the upstream are in it, the same for
  every proxy);
- a `perf record` of the proxy (cpu-clock, 4 kHz), and the kernel functions
  whose time per request differs most from nginx's.

Usage: python3 benches/kernel_time.py [--requests 100000] [--binary target/pgo/shardgate] [--floor [PATH]]
Needs: linux-perf, iproute2 (nstat), nghttp2-client (h2load), nginx, haproxy;
a release build. Talks only to 127.0.0.1; stops everything it starts by PID.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import time

from benchlib import ROOT
from compare import FLOOR, Bench, cpu_seconds

HZ = 4000
COUNTERS = ["TcpInSegs", "TcpOutSegs", "TcpExtTCPPureAcks", "TcpExtDelayedACKs", "IpExtInOctets"]


def nstat():
    out = subprocess.run(["nstat", "-az"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 2 and f[1].isdigit():
            found[f[0]] = int(f[1])
    return found


def kernel_symbols(data, n):
    """Kernel function -> µs per request, from a perf recording of n requests."""
    out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "sym", "--stdio",
                          "-F", "sample,sym"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s+(\d+)\s+\[k\]\s+(\S+)", line)
        if m:
            found[m.group(2)] = int(m.group(1)) * 1e6 / HZ / n
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/shardgate"))
    ap.add_argument("--floor", nargs="?", const=FLOOR, default=None,
                    help="also the floor proxy (benches/floor_proxy.rs; default: its release build)")
    args = ap.parse_args()
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} missing: run cargo build --release first")
    n = args.requests
    bench = Bench("shardgate-kernel-time-", args.binary, floor=args.floor)
    upstream_argv, proxies = bench.job()

    def measure(name, pid, port):
        load = ["taskset", "-c", "1", "h2load", "--h1", "-c", "16", "-t", "1",
                "-H", "x-shard-key: user:42", f"http://127.0.0.1:{port}/kv/user:42"]
        subprocess.run(load + ["-n", "5000"], capture_output=True, check=True, timeout=120)
        data = os.path.join(bench.work, f"{name}.perf")
        rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", str(HZ), "-o", data,
                                "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)  # perf attaches; a request missed here is not counted
            # One process each here (nginx without a master): /proc/PID
            # counts all of its threads.
            before, cpu_before = nstat(), cpu_seconds([pid])
            out = subprocess.run(load + ["-n", str(n)], capture_output=True, text=True,
                                 check=True, timeout=600).stdout
            after, cpu_after = nstat(), cpu_seconds([pid])
        finally:
            rec.send_signal(signal.SIGINT)
            rec.wait(60)
        if f"{n} succeeded" not in out:
            raise RuntimeError(f"{name}: requests failed:\n{out}")
        user, system = ((cpu_after[i] - cpu_before[i]) * 1e6 / n for i in (0, 1))
        packets = {k: (after.get(k, 0) - before.get(k, 0)) / n for k in COUNTERS}
        print(f"{name}: user {user:.2f} µs/req, system {system:.2f} µs/req", file=sys.stderr)
        return name, user, system, packets, kernel_symbols(data, n)

    rows = bench.each_proxy(upstream_argv, proxies, None, measure)
    print(f"\nper proxied request ({n:,} HTTP/1.1 keep-alive requests, 16 connections)\n")
    print("| proxy | user µs | system µs | " + " | ".join(COUNTERS) + " |")
    print("|---|---:|---:|" + "---:|" * len(COUNTERS))
    for name, user, system, packets, _ in rows:
        cells = " | ".join(f"{packets[k]:.2f}" if k != "IpExtInOctets" else f"{packets[k]:.0f}"
                           for k in COUNTERS)
        print(f"| {name} | {user:.2f} | {system:.2f} | {cells} |")
    by_name = {r[0]: r[4] for r in rows}
    hap, fl = by_name.get("haproxy", {}), by_name.get("floor")
    # Against nginx, and against the floor (what shardgate adds to its stack).
    for ref in [r for r in ("nginx", "floor") if r in by_name and "shardgate" in by_name]:
        base, sg = by_name[ref], by_name["shardgate"]
        diff = sorted(set(base) | set(sg), key=lambda s: sg.get(s, 0) - base.get(s, 0))
        print(f"\nkernel functions, µs per request (perf samples; shardgate − {ref}, largest both ways)\n")
        print("| function | shardgate | nginx | HAProxy |" + (" floor |" if fl is not None else "")
              + f" shardgate − {ref} |")
        print("|---|---:|---:|---:|" + ("---:|" if fl is not None else "") + "---:|")
        ng = by_name.get("nginx", {})
        for s in diff[-10:][::-1] + diff[:5]:
            floor = f" {fl.get(s, 0):.3f} |" if fl is not None else ""
            print(f"| `{s}` | {sg.get(s, 0):.3f} | {ng.get(s, 0):.3f} | {hap.get(s, 0):.3f} |{floor} "
                  f"{sg.get(s, 0) - base.get(s, 0):+.3f} |")

if __name__ == "__main__":
    main()
