#!/usr/bin/env python3
"""Failover timing with the real binaries: coordinator, nodes (`shardgate
node`: key-value store + agent in one process) and proxy, all on 127.0.0.1.

Each round starts a fresh one-partition cluster (primary + two replicas), runs a
writer that PUTs back to back through the proxy, kills the primary's process
(SIGKILL), and measures:

- propagation: from the coordinator publishing the new epoch (a watch on its
  /v1/cluster/topology returns) to the proxy's /admin/topology showing it;
- write unavailability: with buffering off, from the kill to the first
  successful write after the failed ones; with buffering on, the longest write
  across the failover (writes are held, not failed).

Detection is bounded by heartbeat_timeout (1 s here, agents beat every 0.2 s,
sweep every 100 ms); the figures show what shardgate adds on top.

With --store etcd://HOST:PORT[,...] the coordinator keeps its state in that
etcd cluster (a fresh key prefix per round), with --store postgres://... on
that server (a fresh database per round), instead of a state file.

Usage: python3 benches/failover.py [--rounds 20] [--binary target/release/shardgate]
                                   [--store etcd://127.0.0.1:2379,...|postgres://...] [--buffering off]
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from benchlib import ROOT, free_port, stop_all, wait_port, write_topology


def http(method, url, body=None, timeout=30):
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Cluster:
    def store_url(self, store):
        """A fresh, empty store for this round: a file, a new etcd key prefix,
        or a new database on the PostgreSQL server `store` names."""
        if not store:
            return f"file:{self.dir}/state.json"
        if store.startswith("postgres"):
            name = f"failover_{os.getpid()}_{time.time_ns()}"
            subprocess.run(["psql", store, "-qc", f"CREATE DATABASE {name}"], check=True)
            return store.rsplit("/", 1)[0] + "/" + name
        hosts = store.removeprefix("etcd://").split("/")[0]
        return f"etcd://{hosts}/failover-{os.getpid()}-{time.time_ns()}"

    def __init__(self, binary, buffering, env=None, store=None):
        self.dir = tempfile.mkdtemp(prefix="shardgate-failover-")
        self.procs = []
        self.binary = binary
        self.env = env
        chttp, cgrpc = free_port(), free_port()
        # Three members: with majority writes (the node's default) a promoted
        # replica needs one other live member to acknowledge anything.
        self.nodes = {"primary": free_port(), "replica": free_port(), "replica2": free_port()}
        topo = write_topology(os.path.join(self.dir, "map.json"), [list(self.nodes.values())])
        self.coordinator = f"http://127.0.0.1:{chttp}"
        self.spawn("coordinator", [binary, "coordinator", "--http-listen", f"127.0.0.1:{chttp}",
                                   "--grpc-listen", f"127.0.0.1:{cgrpc}", "--topology", topo,
                                   "--store", self.store_url(store),
                                   "--heartbeat-timeout", "1", "--sweep-interval", "0.1"])
        wait_port(chttp)
        for role, port in self.nodes.items():
            # Heartbeats well inside the 666 ms lease a 1 s timeout grants.
            self.spawn(role, [binary, "node", "--id", role, "--listen", f"127.0.0.1:{port}",
                              "--coordinator", f"127.0.0.1:{cgrpc}", "--interval", "0.2"])
            wait_port(port)
        pport, aport = free_port(), free_port()
        cfg = os.path.join(self.dir, "proxy.toml")
        with open(cfg, "w") as f:
            f.write(f'[server]\nlisten = "127.0.0.1:{pport}"\nadmin_listen = "127.0.0.1:{aport}"\n'
                    f'[topology]\nsources = ["{self.coordinator}"]\n'
                    f'[failover_buffer]\nenabled = {"true" if buffering else "false"}\nmax_wait = "10s"\n'
                    f'[log]\nlevel = "warn"\n')
        self.spawn("proxy", [binary, "proxy", "--config", cfg])
        wait_port(pport)
        self.proxy = f"http://127.0.0.1:{pport}"
        self.admin = f"http://127.0.0.1:{aport}"
        # Every node heartbeated at least once.
        deadline = time.time() + 10
        while time.time() < deadline:
            _, body = http("GET", self.coordinator + "/v1/cluster/nodes")
            if len(json.loads(body)["nodes"]) == len(self.nodes):
                break
            time.sleep(0.05)

    def spawn(self, name, argv):
        log = open(os.path.join(self.dir, f"{name}.log"), "w")
        p = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env)
        self.procs.append((name, p))

    def pid(self, name):
        return next(p for n, p in self.procs if n == name)

    def stop(self):
        stop_all([p for _, p in self.procs], self.dir)


def one_round(binary, buffering, env=None, store=None):
    """One failover; `env` (default: this process's) is the cluster processes' environment."""
    c = Cluster(binary, buffering, env, store)
    try:
        writes = []  # (started, finished, status)
        stop = threading.Event()

        def writer():
            n = 0
            while not stop.is_set() and n < 100_000:
                n += 1
                t0 = time.monotonic()
                status, _ = http("PUT", f"{c.proxy}/kv/k", b"v%d" % n, timeout=20)
                writes.append((t0, time.monotonic(), status))

        w = threading.Thread(target=writer)
        w.start()
        time.sleep(0.5)
        seen = {}

        def watch():
            http("GET", c.coordinator + "/v1/cluster/topology?waitForEpochAbove=1", timeout=30)
            seen["coordinator"] = time.monotonic()

        wt = threading.Thread(target=watch)
        wt.start()
        time.sleep(0.05)
        killed = time.monotonic()
        c.pid("primary").send_signal(signal.SIGKILL)
        wt.join()
        while True:
            _, body = http("GET", c.admin + "/admin/topology")
            if json.loads(body)["epoch"] == 2:
                seen["proxy"] = time.monotonic()
                break
            time.sleep(0.0005)
        time.sleep(1.0)
        stop.set()
        w.join()
        after = [x for x in writes if x[1] > killed]
        failed = [x for x in after if x[2] != 200]
        if failed:
            last_fail = max(x[1] for x in failed)
            ok_after = min(x[1] for x in after if x[2] == 200 and x[1] > last_fail)
            window = ok_after - killed
        else:
            window = max(x[1] - max(x[0], killed) for x in after)
        return {
            "propagation_ms": (seen["proxy"] - seen["coordinator"]) * 1000,
            "detection_ms": (seen["coordinator"] - killed) * 1000,
            "window_ms": window * 1000,
            "failed_writes": len(failed),
        }
    finally:
        c.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/shardgate"))
    ap.add_argument("--store", default=None,
                    help="etcd://HOST:PORT[,...] or postgres://...: the coordinator's store (default a file)")
    ap.add_argument("--buffering", choices=["both", "off", "on"], default="both")
    args = ap.parse_args()
    results = {}
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.buffering]
    for buffering in modes:
        rows = []
        for r in range(args.rounds):
            row = one_round(args.binary, buffering, store=args.store)
            rows.append(row)
            print(f"buffering={'on' if buffering else 'off'} round {r + 1}: "
                  + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  file=sys.stderr)
        results[buffering] = rows
    store = args.store.split(":")[0] if args.store else "file"
    print(f"\n{args.rounds} failovers per mode, {store} store; heartbeat_timeout 1 s, agents every 0.2 s, "
          "sweep 0.1 s\n")
    print("| buffering | detection (kill → new epoch) median / max | propagation coordinator → proxy median / max | write unavailability median / max | failed writes (total) |")
    print("|---|---:|---:|---:|---:|")
    for buffering, rows in results.items():
        col = lambda k: [r[k] for r in rows]
        print(f"| {'on' if buffering else 'off'} "
              f"| {statistics.median(col('detection_ms')):.0f} / {max(col('detection_ms')):.0f} ms "
              f"| {statistics.median(col('propagation_ms')):.1f} / {max(col('propagation_ms')):.1f} ms "
              f"| {statistics.median(col('window_ms')):.0f} / {max(col('window_ms')):.0f} ms "
              f"| {sum(col('failed_writes'))} |")


if __name__ == "__main__":
    main()
