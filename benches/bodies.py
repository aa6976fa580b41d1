#!/usr/bin/env python3
"""Large bodies through the proxy: shardgate vs nginx vs HAProxy, same job.

compare.py's job (one worker on CPU 0, keyed routing to pooled upstreams),
with an upstream nginx (CPU 1) that serves 1 MiB and 100 MiB files and reads
uploads of any size whole before it answers. Each proxy streams both ways: nginx with request and
response buffering off (its default spools large bodies to disk), HAProxy and
shardgate as they ship. For each proxy in turn, curl (CPU 1) downloads and
uploads each size --repeat times (100 MiB: a third as many) over a fresh
connection each; reported: throughput (body bytes over curl's total time,
median of the transfers) and the proxy's peak RSS (VmHWM) after each size,
beside its RSS when idle before the first transfer.

Usage: python3 benches/bodies.py [--repeat 9] [--binary target/pgo/shardgate] [--only shardgate nginx]
Needs: nginx, haproxy, curl; a release build. Talks only to 127.0.0.1; stops
everything it starts by PID.
"""

import argparse
import os
import statistics
import subprocess
import sys

from benchlib import ROOT, free_port
from compare import Bench

SIZES = [("1 MiB", 1 << 20), ("100 MiB", 100 << 20)]


def kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def transfer(port, direction, path, size, upload_file):
    """One curl transfer over a new connection: MB/s."""
    url = f"http://127.0.0.1:{port}/kv/{path}"
    cmd = ["taskset", "-c", "1", "curl", "-sS", "-o", "/dev/null", "-H", "x-shard-key: user:42",
           "-w", "%{http_code} %{time_total}"]
    if direction == "upload":
        cmd += ["-T", upload_file]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=300, check=True).stdout
    code, seconds = out.split()
    if code != "200":
        raise RuntimeError(f"{direction} {path}: HTTP {code}")
    return size / float(seconds) / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/shardgate"))
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} missing: run cargo build --release first")
    bench = Bench("shardgate-bodies-", args.binary)
    www = os.path.join(bench.work, "www")
    os.makedirs(os.path.join(www, "kv"))
    files = {}
    for label, size in SIZES:
        name = f"blob{size}"
        path = os.path.join(www, "kv", name)
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20) * (size >> 20))
        files[label] = (name, path, size)
    # An upload is answered only once the upstream has read all of it: nginx
    # reads a body whole before proxying it (to a sink that answers), while a
    # plain `return` would answer at once and let the client stop sending.
    sink = free_port()
    upstream, proxies = bench.job(
        up_location=f"client_max_body_size 0; client_body_buffer_size 128m; root {www}; "
                    f"if ($request_method != GET) {{ proxy_pass http://127.0.0.1:{sink}; }}",
        up_extra=f'server {{ listen 127.0.0.1:{sink}; client_max_body_size 0; location / {{ return 200 "ok\\n"; }} }}',
        ng_extra="client_max_body_size 0; proxy_request_buffering off; proxy_buffering off;",
    )

    def measure(name, pid, port):
        row = {"proxy": name, "idle": kib(pid, "VmRSS")}
        for label, (path, upload_file, size) in files.items():
            n = args.repeat if size <= (1 << 20) else max(1, args.repeat // 3)
            for direction in ("download", "upload"):
                rates = [transfer(port, direction, path, size, upload_file) for _ in range(n)]
                row[(label, direction)] = statistics.median(rates)
            row[(label, "peak")] = kib(pid, "VmHWM")
            print(f"{name}: {label}: " + ", ".join(
                f"{d} {row[(label, d)]:.0f} MB/s" for d in ("download", "upload"))
                  + f", peak RSS {row[(label, 'peak')] / 1024:.1f} MiB", file=sys.stderr)
        return row

    rows = bench.each_proxy(upstream, proxies, args.only, measure)
    print(f"\n{args.repeat} transfers per size and direction (100 MiB: {max(1, args.repeat // 3)}), "
          "a new connection each; proxy on CPU 0, curl and the upstream on CPU 1; medians\n")
    print("| proxy | idle RSS | 1 MiB down | 1 MiB up | peak RSS after 1 MiB | 100 MiB down | 100 MiB up "
          "| peak RSS after 100 MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r['idle'] / 1024:.1f} MiB"]
        for label, _ in SIZES:
            cells += [f"{r[(label, 'download')]:.0f} MB/s", f"{r[(label, 'upload')]:.0f} MB/s",
                      f"{r[(label, 'peak')] / 1024:.1f} MiB"]
        print(f"| {r['proxy']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
