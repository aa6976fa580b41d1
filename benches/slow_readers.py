#!/usr/bin/env python3
"""Peak memory with clients that stop reading: shardgate vs nginx vs HAProxy.

Each proxy runs compare.py's job (one worker, pooled upstreams), except that
the upstream nginx answers every request with a 64 MiB file. For each proxy:

  1. read its settled RSS (the baseline);
  2. HTTP/1: open N connections with a 4 KiB receive buffer, send one keyed
     GET on each and read nothing; poll RSS for --hold seconds, keep the peak;
  3. close them and read RSS once it settles ("after close");
  4. HTTP/2 (shardgate only, with --h2): h2load with a zero stream window
     (-w 1: a one-byte stream window; -W 30: the connection window is no limit), C connections x 256 streams, for --hold seconds; peak RSS.

Per slow reader is (peak - baseline) / N. With --baseline PATH another
shardgate build runs as "baseline", for a before/after in one run.

Usage: python3 benches/slow_readers.py [--readers 64] [--hold 10] [--h2]
                                       [--baseline OLD] [--only shardgate]
Needs: nginx, haproxy, h2load (for --h2); a release build.
Talks only to 127.0.0.1; stops everything it starts by PID.
"""

import argparse
import os
import socket
import subprocess
import sys
import time

from benchlib import ROOT
from compare import Bench
from idle import rss_kib, settled_rss

BIG = 64 * 1024 * 1024
REQUEST = b"GET /big HTTP/1.1\r\nHost: bench\r\nx-shard-key: user:%d\r\n\r\n"


def peak_while(pid, seconds):
    peak = rss_kib(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
        peak = max(peak, rss_kib(pid))
    return peak


def slow_http1(pid, port, n, hold):
    socks = []
    for i in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(REQUEST % i)
        socks.append(s)
    peak = peak_while(pid, hold)
    for s in socks:
        s.close()
    return peak


def zero_window_h2(pid, port, conns, hold):
    # h2load opens the streams and never grants them a window; it is
    # stopped by PID after `hold` seconds.
    argv = ["h2load", "-c", str(conns), "-m", "256", "-n", str(conns * 256), "-w", "1", "-W", "30",
            "-H", "x-shard-key: user:1", f"http://127.0.0.1:{port}/big"]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return peak_while(pid, hold)
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--readers", type=int, default=64)
    ap.add_argument("--hold", type=float, default=10)
    ap.add_argument("--h2", action="store_true", help="also 4 x 256 zero-window HTTP/2 streams")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/shardgate"))
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()

    bench = Bench("shardgate-slow-", args.binary, args.baseline)
    work = bench.work
    with open(os.path.join(work, "big.bin"), "wb") as f:
        f.write(b"x" * BIG)
    os.environ["SHARDGATE_BENCH_EXTRA"] = ""  # HTTP/2 is on by default
    upstream_argv, proxies = bench.job()
    up_conf = os.path.join(work, "upstream.conf")
    text = open(up_conf).read().replace('return 200 "ok\\n";', f"root {work}; try_files /big.bin =404;")
    open(up_conf, "w").write(text)

    def one(name, pid, port):
        base = settled_rss(pid, 30)
        peak = slow_http1(pid, port, args.readers, args.hold)
        after = settled_rss(pid, 30, target=base * 1.10)
        row = {"name": name, "base": base, "peak": peak, "after": after, "h2": None}
        if args.h2 and name in ("shardgate", "baseline"):
            row["h2"] = zero_window_h2(pid, port, 4, args.hold)
            row["h2_after"] = settled_rss(pid, 30, target=base * 1.10)
        per = (peak - base) / args.readers
        print(f"{name}: base {base} KiB, peak {peak} KiB ({per:,.0f} KiB per slow reader), "
              f"after close {after} KiB" + (f", h2 one-byte-window peak {row['h2']} KiB, after "
                                            f"{row['h2_after']} KiB" if row["h2"] else ""),
              flush=True)
        return row

    rows = bench.each_proxy(upstream_argv, proxies, args.only, one)
    if not rows:
        sys.exit("nothing measured")


if __name__ == "__main__":
    main()
