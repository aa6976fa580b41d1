#!/usr/bin/env python3
"""What the gate (SPEC §8) costs: wrk straight to a node beside wrk through
`shardgate agent --gate-listen` in front of it, on 127.0.0.1.

The node is nginx answering 200 from memory, so the node's own cost is
close to nothing and the difference is the gate's loopback hop. Reads (GET)
pass without a check; writes (PUT with x-cluster-epoch) are checked against
the node's role, lease and epoch. The gate runs on CPU 0; nginx and wrk on
CPU 1. Reported per workload: requests/s, p50 and p99 latency, and the
gate's CPU per request (its scheduler runtime over the run).

Usage: python3 benches/gate.py [--seconds 5] [--connections 16]
                               [--binary target/release/shardgate]
Needs: nginx, wrk. Stops everything it starts by PID.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchlib import ROOT, free_port, wait_port
from compare import Proc, cpu_seconds, nginx_conf, run_wrk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/shardgate"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="shardgate-gate-")
    node_port, chttp, cgrpc = free_port(), free_port(), free_port()
    conf = nginx_conf(work, "node", f"""
  server {{ listen 127.0.0.1:{node_port}; location / {{ return 200 "ok\\n"; }} }}""")
    procs = [Proc("node", ["nginx", "-c", conf, "-p", work], work, cpu=1)]
    try:
        wait_port(node_port)
        placeholder = os.path.join(work, "placeholder.json")
        with open(placeholder, "w") as f:
            json.dump({"clusterEpoch": 1, "masterNodeId": "c", "partitionCount": 1, "partitions": [
                {"partitionIndex": 0, "primaryNodeIp": "127.0.0.2:9", "replicaNodeIps": [],
                 "hashRangeStart": "00000000", "hashRangeEnd": "ffffffff"}]}, f)
        with open(os.path.join(work, "coordinator.toml"), "w") as f:
            f.write('[coordinator]\nadmin_token = "bench"\nmax_clock_skew = "5s"\n')
        procs.append(Proc("coordinator", [args.binary, "coordinator", "--config", os.path.join(work, "coordinator.toml"),
                                          "--http-listen", f"127.0.0.1:{chttp}", "--grpc-listen", f"127.0.0.1:{cgrpc}",
                                          "--topology", placeholder, "--store", f"file:{work}/state.json",
                                          "--heartbeat-timeout", "3", "--sweep-interval", "0.5"], work, cpu=1))
        wait_port(chttp)
        gate_port = free_port()
        gate = Proc("gate", [args.binary, "agent", "--coordinator", f"127.0.0.1:{cgrpc}", "--node-id", "g",
                             "--interval", "0.5", "--gate-listen", f"127.0.0.1:{gate_port}",
                             "--node", f"http://127.0.0.1:{node_port}"], work, cpu=0)
        procs.append(gate)
        wait_port(gate_port)
        doc = json.dumps({"clusterEpoch": 2, "masterNodeId": "c", "partitionCount": 1, "partitions": [
            {"partitionIndex": 0, "primaryNodeIp": f"127.0.0.1:{gate_port}", "replicaNodeIps": [],
             "hashRangeStart": "00000000", "hashRangeEnd": "ffffffff"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{chttp}/v1/cluster/topology", data=doc, method="PUT",
                                     headers={"authorization": "Bearer bench", "content-type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
        put = os.path.join(work, "put.lua")
        with open(put, "w") as f:
            f.write('wrk.method = "PUT"\nwrk.body = "0123456789abcdef"\nwrk.headers["x-cluster-epoch"] = "2"\n')
        deadline = time.time() + 10
        while True:
            try:
                r = urllib.request.Request(f"http://127.0.0.1:{gate_port}/kv/x", data=b"v", method="PUT",
                                           headers={"x-cluster-epoch": "2"})
                urllib.request.urlopen(r, timeout=2).read()
                break
            except Exception:
                if time.time() > deadline:
                    sys.exit("the gate never became primary")
                time.sleep(0.1)
        rows = []
        for name, script in (("GET", None), ("PUT", put)):
            direct = run_wrk(node_port, args.seconds, args.connections, script=script)
            before = cpu_seconds(gate.pids())[2]
            through = run_wrk(gate_port, args.seconds, args.connections, script=script)
            cpu = cpu_seconds(gate.pids())[2] - before
            rows.append((name, direct, through, cpu / through[0] * 1e6))
            print(f"{name}: direct {direct[1]:,.0f} req/s p50 {direct[2]:.0f} µs p99 {direct[3]:.0f} µs; "
                  f"gate {through[1]:,.0f} req/s p50 {through[2]:.0f} µs p99 {through[3]:.0f} µs, "
                  f"{cpu / through[0] * 1e6:.1f} µs CPU/request", file=sys.stderr)
        print(f"\nnginx node answering from memory, wrk -c{args.connections} for {args.seconds} s each; "
              f"the gate on CPU 0, nginx and wrk on CPU 1\n")
        print("| workload | direct p50 / p99 | through the gate p50 / p99 | added p50 / p99 | gate CPU per request |")
        print("|---|---:|---:|---:|---:|")
        for name, d, g, cpu in rows:
            print(f"| {name} | {d[2]:.0f} / {d[3]:.0f} µs | {g[2]:.0f} / {g[3]:.0f} µs "
                  f"| {g[2] - d[2]:.0f} / {g[3] - d[3]:.0f} µs | {cpu:.1f} µs |")
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    main()
