#!/usr/bin/env python3
"""User-space instructions per proxied request: shardgate vs nginx vs HAProxy.

Wall-clock CPU per request on this shared 2-core machine moves by ~4 %
between identical builds, so a change worth 2 % cannot be judged by it. This
counts instead: each proxy runs the job of compare.py under valgrind's
callgrind; after a warm-up of 2,000 requests the counters are zeroed, N
requests are sent (h2load, HTTP/1.1, 16 keep-alive connections), and the
instructions the proxy executed in user space are divided by N. The count is
deterministic to within a fraction of a percent, so two builds can be
compared exactly (--baseline). It says nothing about kernel time (~70 % of
the cost of a proxied request on loopback), cache misses or atomics: use it
beside compare.py, not instead of it.

The shipped binary is the profile-guided one (scripts/build-release): pass
--binary target/pgo/shardgate to count it; the default is the plain release build.

Usage: python3 benches/instructions.py [--requests 20000] [--binary target/pgo/shardgate]
                                       [--baseline target/base/shardgate]
                                       [--only shardgate baseline] [--write]
--write sends each request as a POST with a 16-byte body: a write, which
shardgate stamps with its HLC and answers with a read-your-writes token.
CG_EXTRA="--dump-instr=yes" (any valgrind options) is passed through, e.g. to
find call sites inlined away, by instruction address and `addr2line -i`.
Needs: valgrind, nghttp2-client (h2load), nginx, haproxy; a release build.
Talks only to 127.0.0.1; stops everything it starts by PID.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile

from benchlib import ROOT, free_port, wait_port
from compare import Proc, job

WARMUP = 2000


BODY = None  # a file with the body of each request, for --write


def h2load(port, n):
    data = ["-d", BODY] if BODY else []
    out = subprocess.run(
        ["h2load", "--h1", "-n", str(n), "-c", "16", "-t", "1", "-H", "x-shard-key: user:42",
         *data, f"http://127.0.0.1:{port}/kv/user:42"],
        capture_output=True, text=True, timeout=600,
    ).stdout
    if f"{n} succeeded" not in out or f"status codes: {n} 2xx" not in out:
        raise RuntimeError(f"requests failed:\n{out}")


def instructions_per_request(name, argv, port, n, work):
    """Run `argv` under callgrind, count the instructions of `n` requests after a warm-up."""
    prefix = os.path.join(work, f"callgrind.{name}")
    p = subprocess.Popen(
        ["valgrind", "--tool=callgrind", *os.environ.get("CG_EXTRA", "").split(), f"--callgrind-out-file={prefix}.%p", *argv],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"{name}.valgrind.log"), "w"),
    )
    try:
        wait_port(port, timeout=120)
        h2load(port, WARMUP)
        subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True, capture_output=True)
        h2load(port, n)
        subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True)
    finally:
        p.terminate()
        p.wait(60)
    # Part 1 is the dump taken right after the measured requests.
    [dump] = glob.glob(f"{prefix}.{p.pid}.1")
    with open(dump) as f:
        for line in f:
            if line.startswith("summary:"):
                return int(line.split()[1]) / n
    raise RuntimeError(f"no summary in {dump}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/shardgate"))
    ap.add_argument("--baseline", default=None, help="another shardgate binary to count beside this one")
    ap.add_argument("--only", nargs="*", default=None, help="count only these proxies")
    ap.add_argument("--write", action="store_true", help="POST a small body (a write) instead of GET")
    args = ap.parse_args()
    global BODY
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} missing: run cargo build --release first")

    work = tempfile.mkdtemp(prefix="shardgate-instructions-")
    if args.write:
        BODY = os.path.join(work, "body")
        with open(BODY, "w") as f:
            f.write("0123456789abcdef")
    ups = [free_port() for _ in range(3)]
    names = ["nginx", "haproxy", "shardgate"] + (["baseline"] if args.baseline else [])
    ports = {n: free_port() for n in names}
    admin = {"shardgate": free_port(), "baseline": free_port()}
    builds = [("shardgate", args.binary)] + ([("baseline", args.baseline)] if args.baseline else [])
    upstream_argv, proxies = job(work, ups, ports, admin, builds)
    upstream = Proc("upstream", upstream_argv, work, cpu=1)
    counts = {}
    try:
        for p in ups:
            wait_port(p)
        for name, argv in proxies:
            if args.only and name not in args.only:
                continue
            counts[name] = instructions_per_request(name, argv, ports[name], args.requests, work)
            print(f"{name}: {counts[name]:,.0f} instructions/request", file=sys.stderr)
    finally:
        upstream.stop()

    peers = [counts[n] for n in ("nginx", "haproxy") if n in counts]
    best = min(peers) if peers else None
    what = "POSTs of 16 bytes" if args.write else "requests"
    print(f"\nuser-space instructions per request (callgrind, {args.requests:,} {what} after "
          f"{WARMUP:,} warm-up, 16 keep-alive connections)\n")
    print("| proxy | instructions/request | vs best peer |")
    print("|---|---:|---:|")
    for n in [n for n in ["nginx", "haproxy", "baseline", "shardgate"] if n in counts]:
        ratio = f"{counts[n] / best:.2f}×" if best else "—"
        print(f"| {n} | {counts[n]:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
