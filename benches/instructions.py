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
the cost of a proxied request on loopback) or cache misses: use it beside
compare.py, not instead of it.

--detail also counts, per request, the calls into the allocator (malloc,
calloc, realloc, posix_memalign and jemalloc's own entry points: the
allocations, not the frees) and the atomic read-modify-writes executed (x86
instructions with a `lock` prefix, and `xchg` with memory, which locks
implicitly): callgrind records how often each instruction of each object ran
(by its address in the file), and objdump says
which of its instructions are atomic. Contended or not, each costs a full
barrier on x86, and on two cores they are the part of user time that does not
shrink with fewer instructions.

The shipped binary is the profile-guided one (scripts/build-release): pass
--binary target/pgo/shardgate to count it; the default is the plain release build.

Usage: python3 benches/instructions.py [--requests 20000] [--binary target/pgo/shardgate]
                                       [--baseline target/base/shardgate]
                                       [--only shardgate baseline] [--write] [--detail]
--write sends each request as a POST with a 16-byte body: a write, which
shardgate stamps with its HLC and answers with a read-your-writes token.
CG_EXTRA="--dump-instr=yes" (any valgrind options) is passed through, e.g. to
find call sites inlined away, by instruction address and `addr2line -i`.
Needs: valgrind, nghttp2-client (h2load), nginx, haproxy; a release build.
Talks only to 127.0.0.1; stops everything it starts by PID.
"""

import argparse
import collections
import glob
import os
import re
import subprocess
import sys
import tempfile

from benchlib import ROOT, free_port, wait_port
from compare import FLOOR, NAMES, Proc, job

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


# The allocator's entry points that hand out memory, glibc's and jemalloc's
# (tikv-jemallocator links it with the `_rjem_` prefix).
ALLOCATING = {"malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc", "memalign",
              "_rjem_malloc", "_rjem_mallocx", "_rjem_calloc", "_rjem_realloc", "_rjem_rallocx",
              "_rjem_posix_memalign", "_rjem_aligned_alloc"}


def atomic_addresses(path):
    """File addresses of the atomic read-modify-write instructions in `path`."""
    out = subprocess.run(["objdump", "-d", "-w", "--no-show-raw-insn", path],
                         capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(.*)", line)
        if not m:
            continue
        insn = m.group(2)
        if insn.startswith("lock ") or (insn.startswith("xchg") and "(" in insn):
            found.add(int(m.group(1), 16))
    return found


def detail(dump, n):
    """(allocator calls, atomic instructions) per request from a callgrind
    dump written with --dump-instr=yes --compress-pos=no --compress-strings=no."""
    executed = collections.defaultdict(collections.Counter)  # object -> address -> count
    allocs = 0
    ob = cfn = None
    after_call = False
    positions = 1  # "positions: instr line" puts the line number before the cost
    with open(dump) as f:
        for line in f:
            if line.startswith("positions:"):
                positions = len(line.split()) - 1
            elif line.startswith("ob="):
                ob = line[3:].strip()
            elif line.startswith("cfn="):
                cfn = line[4:].strip()
            elif line.startswith("calls="):
                if cfn in ALLOCATING:
                    allocs += int(line.split()[0][6:])
                after_call = True
            elif line.startswith("0x"):
                if after_call:  # the inclusive cost of the call just named
                    after_call = False
                    continue
                fields = line.split()
                executed[ob][int(fields[0], 16)] += int(fields[positions])
    atomics = 0
    for obj, counts in executed.items():
        if os.path.exists(obj):
            atomics += sum(counts.get(a, 0) for a in atomic_addresses(obj))
    return allocs / n, atomics / n


def instructions_per_request(name, argv, port, n, work, with_detail=False):
    """Run `argv` under callgrind, count the instructions of `n` requests after
    a warm-up: (instructions, allocator calls, atomics) per request, the last
    two None unless `with_detail`."""
    prefix = os.path.join(work, f"callgrind.{name}")
    extra = ["--dump-instr=yes", "--compress-pos=no", "--compress-strings=no"] if with_detail else []
    p = subprocess.Popen(
        ["valgrind", "--tool=callgrind", *extra, *os.environ.get("CG_EXTRA", "").split(),
         f"--callgrind-out-file={prefix}.%p", *argv],
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
                instructions = int(line.split()[1]) / n
                break
        else:
            raise RuntimeError(f"no summary in {dump}")
    if not with_detail:
        return instructions, None, None
    return (instructions, *detail(dump, n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/shardgate"))
    ap.add_argument("--baseline", default=None, help="another shardgate binary to count beside this one")
    ap.add_argument("--floor", nargs="?", const=FLOOR, default=None,
                    help="also count the floor proxy (benches/floor_proxy.rs; default: its release build)")
    ap.add_argument("--only", nargs="*", default=None, help="count only these proxies")
    ap.add_argument("--write", action="store_true", help="POST a small body (a write) instead of GET")
    ap.add_argument("--detail", action="store_true",
                    help="also count allocator calls and atomic instructions per request")
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
    names = ["nginx", "haproxy", "shardgate"] + (["baseline"] if args.baseline else []) + (["floor"] if args.floor else [])
    ports = {n: free_port() for n in names}
    admin = {"shardgate": free_port(), "baseline": free_port()}
    builds = [("shardgate", args.binary)] + ([("baseline", args.baseline)] if args.baseline else [])
    upstream_argv, proxies = job(work, ups, ports, admin, builds, floor=args.floor)
    upstream = Proc("upstream", upstream_argv, work, cpu=1)
    counts = {}
    try:
        for p in ups:
            wait_port(p)
        for name, argv in proxies:
            if args.only and name not in args.only:
                continue
            counts[name] = instructions_per_request(name, argv, ports[name], args.requests, work, args.detail)
            print(f"{name}: {counts[name][0]:,.0f} instructions/request", file=sys.stderr)
    finally:
        upstream.stop()

    peers = [counts[n][0] for n in ("nginx", "haproxy") if n in counts]
    best = min(peers) if peers else None
    what = "POSTs of 16 bytes" if args.write else "requests"
    print(f"\nuser-space instructions per request (callgrind, {args.requests:,} {what} after "
          f"{WARMUP:,} warm-up, 16 keep-alive connections)\n")
    more = " allocator calls/request | atomic RMWs/request |" if args.detail else ""
    print(f"| proxy | instructions/request | vs best peer |{more}")
    print("|---|---:|---:|" + ("---:|---:|" if args.detail else ""))
    for n in [n for n in NAMES if n in counts]:
        instructions, allocs, atomics = counts[n]
        ratio = f"{instructions / best:.2f}×" if best else "—"
        cells = f" {allocs:.1f} | {atomics:.1f} |" if args.detail else ""
        print(f"| {n} | {instructions:,.0f} | {ratio} |{cells}")


if __name__ == "__main__":
    main()
