#!/usr/bin/env python3
"""Profile-guided build of the floor proxy (benches/floor_proxy.rs), so the
floor can stand beside the profile-guided shardgate (scripts/build-release)
as it stands beside the plain one.

It builds the floor instrumented, runs compare.py's keep-alive job through it
(wrk, 64 connections, 20 s: the floor does nothing else, so that is its
whole profile), merges the profile and rebuilds with it, like
scripts/build-release does for shardgate. Writes target/pgo/floor_proxy.

Usage: python3 benches/floor_pgo.py
Then:  python3 benches/compare.py --binary target/pgo/shardgate --floor target/pgo/floor_proxy
Needs: nginx, wrk, the llvm-tools rustup component. Talks only to 127.0.0.1;
stops what it starts by PID.
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from benchlib import ROOT, free_port, wait_port
from compare import Proc, job, run_wrk


def rustc(*args):
    return subprocess.run(["rustc", *args], check=True, capture_output=True, text=True).stdout


def main():
    host = next(line.split(": ", 1)[1] for line in rustc("-vV").splitlines() if line.startswith("host: "))
    profdata = os.path.join(rustc("--print", "sysroot").strip(), "lib/rustlib", host, "bin/llvm-profdata")
    if not os.path.exists(profdata):
        sys.exit("llvm-profdata missing: rustup component add llvm-tools")
    out = os.path.join(ROOT, "target/pgo")
    profiles = os.path.join(out, "floor-profiles")
    shutil.rmtree(profiles, ignore_errors=True)

    def build(flags, target_dir):
        # --target keeps RUSTFLAGS off build scripts and proc macros.
        subprocess.run(["cargo", "build", "--release", "--example", "floor_proxy", "--target", host,
                        "--target-dir", target_dir], cwd=ROOT, check=True,
                       env={**os.environ, "RUSTFLAGS": flags})
        return os.path.join(target_dir, host, "release/examples/floor_proxy")

    generate = build(f"-Cprofile-generate={profiles}", os.path.join(out, "floor-generate"))
    work = tempfile.mkdtemp(prefix="shardgate-floor-pgo-")
    ups = [free_port() for _ in range(3)]
    # job() writes every proxy's config; only the floor runs.
    ports = {"nginx": free_port(), "haproxy": free_port(), "floor": free_port()}
    upstream_argv, proxies = job(work, ups, ports, {}, [], floor=generate)
    upstream = Proc("upstream", upstream_argv, work, cpu=1)
    try:
        for p in ups:
            wait_port(p)
        floor = Proc("floor", dict(proxies)["floor"], work, cpu=0)
        try:
            wait_port(ports["floor"])
            run_wrk(ports["floor"], 20, 64)
        finally:
            floor.stop()
    finally:
        upstream.stop()
    merged = os.path.join(out, "floor.profdata")
    subprocess.run([profdata, "merge", "--output", merged, *glob.glob(os.path.join(profiles, "*.profraw"))],
                   check=True)
    built = build(f"-Cprofile-use={merged}", os.path.join(out, "floor-use"))
    shutil.copy(built, os.path.join(out, "floor_proxy"))
    print(f"benches/floor_pgo.py: {os.path.join(out, 'floor_proxy')} (profile-guided)", file=sys.stderr)


if __name__ == "__main__":
    main()
