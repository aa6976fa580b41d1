#!/usr/bin/env python3
"""Side-by-side load comparison: shardgate vs nginx vs HAProxy, same job, same machine.

The job: route each request by the hash of its `x-shard-key` header to one of
three upstream ports, over pooled keep-alive connections, adding the usual
forwarding headers. Every proxy is pinned to CPU 0 with one worker; wrk and
the upstream (an nginx answering "ok") share CPU 1. Rounds are interleaved so
drift on a shared machine hits all three alike; the table reports medians.

CPU per request is the proxy's time on a CPU (the scheduler's exact count,
/proc/PID/task/*/schedstat; split into user and sys by the kernel's tick
samples) divided by the requests wrk completed, so it does not depend on which
side was the bottleneck. Each round starts with a different proxy.

With --tls every proxy terminates TLS with the same ECDSA P-256 certificate
(made here with openssl), TLS 1.2 and 1.3 only, and two workloads run: the
same keep-alive load over TLS, and a new connection (a full TLS handshake,
wrk resumes no sessions) for every request ("Connection: close"), which
measures handshakes per second and CPU per handshake. --close runs that
second workload in clear text too (accept cost without TLS).

The binary we ship is the profile-guided build (scripts/build-release):
measure it with --binary target/pgo/shardgate; the default is the plain
`cargo build --release` binary. Besides the medians, each build's CPU per
request is compared with the better peer of the same round (median of those
per-round ratios), which a noisy host disturbs less.

With --h2 clients speak HTTP/2 (h2c, prior knowledge) instead: h2load on
CPU 1 opens --connections/4 connections with 32 concurrent streams each
(many streams per connection, as browsers and gRPC clients do); every proxy
still speaks HTTP/1.1 to the upstream. p50/p99 come from h2load's
per-request log.

With --spread each proxy runs as it ships, on both cores: shardgate with
`workers = 0` (a thread per core), nginx with 2 worker processes, HAProxy
with `nbthread 2`; nothing is pinned, and wrk (2 threads) and the upstream
share the same two cores. As load generator and proxy then compete for the
same CPUs, CPU per request is also reported for the whole box (/proc/stat,
every CPU, everything running), beside the proxy's own.

With --rate the comparison is at equal load rather than at saturation: nginx's
saturation rate is measured first (wrk), then oha sends a fixed rate, open
loop with latency correction (a late response also delays the requests meant
to go after it, as wrk2 counts), at 50 % and 80 % of it to each proxy in
interleaved rounds: p50, p99 and p99.9, CPU per request, and how much of the
rate oha held. oha then has CPU 1 to itself and the upstream joins the proxy
on CPU 0 (saturation is measured in that layout too): sharing a core with the
upstream, oha could not hold 80 %. With --tls --rate every request is a new
TLS connection (oha --disable-keepalive). `cargo install oha`.

With --floor the floor proxy runs beside them (benches/floor_proxy.rs, built
by `cargo build --release --example floor_proxy`, or pass its path): hyper's
server and pooled client on one tokio thread doing the same job with none of
shardgate's own work, the least any proxy on this stack can spend.

With --baseline PATH a second shardgate build (e.g. the previous commit's)
runs as "baseline" in the same interleaved rounds, so a change is judged by a
ratio measured side by side, not against numbers from another run.

Usage: python3 benches/compare.py [--rounds 5] [--seconds 10] [--connections 64] [--tls] [--close] [--h2]
                                  [--binary target/pgo/shardgate] [--baseline target/base/shardgate] [--floor]
Needs: nginx, haproxy, wrk, openssl, h2load (apt-get install nginx haproxy wrk openssl nghttp2-client),
a release build.
Talks only to 127.0.0.1; stops everything it starts by PID.
"""

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile

from benchlib import ROOT, free_port, self_signed_cert, wait_port, write_topology

CLK_TCK = os.sysconf("SC_CLK_TCK")
# The order of rows in every table.
NAMES = ["nginx", "haproxy", "floor", "baseline", "shardgate"]
FLOOR = os.path.join(ROOT, "target/release/examples/floor_proxy")


def box_cpu_seconds():
    """Busy CPU seconds of the whole machine so far, every CPU (/proc/stat:
    all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]
    return busy / CLK_TCK


def cpu_seconds(pids):
    """(user, system, on-CPU) seconds of the processes, threads included.

    user and system are the kernel's tick samples (1/CONFIG_HZ resolution);
    on-CPU is the scheduler's exact runtime in nanoseconds, summed over the
    threads alive now (/proc/PID/task/*/schedstat). The total is taken from
    the latter and split by the former, which spares the total the sampling
    error of ticks (a few tenths of a percent per 5 s round at HZ=250).
    """
    user = system = 0
    on_cpu_ns = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    on_cpu_ns += int(f.read().split()[0])
        except FileNotFoundError:
            pass
    return user / CLK_TCK, system / CLK_TCK, on_cpu_ns / 1e9


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def to_us(text):
    m = re.match(r"([\d.]+)(us|ms|s|m|h)$", text)
    if not m:
        raise RuntimeError(f"unparseable wrk latency {text!r}")
    v, unit = float(m.group(1)), m.group(2)
    return v * {"us": 1, "ms": 1e3, "s": 1e6, "m": 6e7, "h": 3.6e9}[unit]


class Proc:
    def __init__(self, name, argv, work, cpu=None):
        self.name = name
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu)] + argv
        self.log = open(os.path.join(work, f"{name}.log"), "w")
        self.p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log)

    def pids(self):
        return [self.p.pid] + children(self.p.pid)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def nginx_conf(work, name, body, workers=1):
    path = os.path.join(work, f"{name}.conf")
    with open(path, "w") as f:
        f.write(f"""
worker_processes {workers};
daemon off;
master_process {"off" if workers == 1 else "on"};
pid {work}/{name}.pid;
error_log {work}/{name}.err warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {work}/{name}-body;
  proxy_temp_path {work}/{name}-proxy;
  fastcgi_temp_path {work}/{name}-fcgi;
  uwsgi_temp_path {work}/{name}-uwsgi;
  scgi_temp_path {work}/{name}-scgi;
  keepalive_requests 10000000;
  {body}
}}
""")
    return path


def rotated(order, r):
    """`order` started at its `r`-th entry: each round starts with a different
    proxy, so no proxy always runs right after the same neighbour."""
    k = r % len(order)
    return order[k:] + order[:k]


def run_timed(argv, timeout):
    """Run a load generator to its end: (stdout, its own CPU seconds, user +
    system). The kernel's exact accounting of reaped children (getrusage
    RUSAGE_CHILDREN) grows by the generator's time alone while it runs, as
    nothing else this script starts ends meanwhile; so the load's share of
    the box is measured, not inferred by difference."""
    def reaped():
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    before = reaped()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout).stdout
    return out, reaped() - before


def run_wrk(port, seconds, connections, scheme="http", close=False, script=None, spread=False):
    """wrk on CPU 1 (with `spread`: two threads, anywhere) against
    127.0.0.1:`port`, keyed; `script` a wrk Lua script (another method, a
    body). (requests, req/s, p50 µs, p99 µs, wrk's CPU s)."""
    extra = ["-H", "Connection: close"] if close else []
    if script:
        extra += ["-s", script]
    where = ["wrk", "-t2"] if spread else ["taskset", "-c", "1", "wrk", "-t1"]
    out, load_cpu = run_timed(
        [*where, f"-c{connections}", f"-d{seconds}s", "--latency",
         "-H", "x-shard-key: user:42", *extra, f"{scheme}://127.0.0.1:{port}/kv/user:42"],
        timeout=seconds + 30,
    )
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    dist = out.split("Latency Distribution", 1)[1]
    p50 = to_us(re.search(r"^\s*50%\s+(\S+)", dist, re.M).group(1))
    p99 = to_us(re.search(r"^\s*99%\s+(\S+)", dist, re.M).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if non2xx or errors:
        raise RuntimeError(f"failures during run:\n{out}")
    return reqs, rps, p50, p99, load_cpu


def run_h2load(port, seconds, connections, streams=32):
    """h2load on CPU 1: `connections` HTTP/2 connections with `streams`
    concurrent streams each, keyed. (requests, req/s, p50 µs, p99 µs, h2load's CPU s)."""
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        out, load_cpu = run_timed(
            ["taskset", "-c", "1", "h2load", f"-c{max(1, connections)}", f"-m{streams}", f"-D{seconds}",
             "-H", "x-shard-key: user:42", f"--log-file={log.name}", f"http://127.0.0.1:{port}/kv/user:42"],
            timeout=seconds + 30,
        )
        # start (µs since the epoch), status, µs to the end of the response
        rows = [line.split("\t") for line in log.read().splitlines() if line.strip()]
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                  out)
    if not m or int(m.group(4)) or int(m.group(5)) or any(r[1] != "200" for r in rows):
        raise RuntimeError(f"failures during run:\n{out}")
    reqs = int(m.group(3))
    rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out).group(1))
    lat = sorted(int(r[2]) for r in rows)
    return reqs, rps, lat[len(lat) // 2], lat[min(len(lat) - 1, len(lat) * 99 // 100)], load_cpu


def run_oha(port, seconds, connections, rate, tls=False):
    """oha on CPU 1: `rate` requests per second, open loop, keyed, over
    `connections` keep-alive connections (with `tls`: a new TLS connection
    per request). (requests, req/s, p50, p99, p99.9 µs, oha's CPU s)."""
    scheme = "https" if tls else "http"
    per_request = ["--disable-keepalive", "--insecure"] if tls else []
    out, load_cpu = run_timed(
        ["taskset", "-c", "1", "oha", "--no-tui", "--output-format", "json", "--latency-correction",
         *per_request, "-z", f"{seconds}s", "-q", str(rate), "-c", str(connections),
         "-H", "x-shard-key: user:42", f"{scheme}://127.0.0.1:{port}/kv/user:42"],
        timeout=seconds + 60,
    )
    r = json.loads(out)
    codes = r.get("statusCodeDistribution", {})
    if set(codes) - {"200"} or r["summary"]["successRate"] < 1.0:
        raise RuntimeError(f"failures during run: {codes} {r['summary']}")
    lat = r["latencyPercentiles"]
    reqs = sum(codes.values())
    return (reqs, r["summary"]["requestsPerSec"], lat["p50"] * 1e6, lat["p99"] * 1e6, lat["p99.9"] * 1e6,
            load_cpu)


def measure_rate(args, ports, by_name):
    """p50/p99/p99.9 at 50 % and 80 % of nginx's saturation rate, open loop,
    in interleaved rounds (medians). With --tls every request opens a new TLS
    connection: the slow-first-request comparison at equal load, which a
    closed loop cannot make (the proxy that spends less CPU per handshake
    moves the bottleneck to the generator's core, and wrk's latency then
    measures that core's queue)."""
    tls = args.tls
    saturation = run_wrk(ports["nginx"], args.seconds, args.connections,
                         "https" if tls else "http", close=tls)[1]
    what = "a new TLS connection per request" if tls else "keep-alive"
    print(f"nginx saturates at {saturation:,.0f} req/s (wrk, {args.connections} connections, {what})",
          file=sys.stderr)
    print(f"\nFixed rate, {what}, open loop (oha, latency-corrected, {args.connections} connections, "
          f"{args.rounds} interleaved rounds of {args.seconds}s, medians); nginx's saturation rate "
          f"{saturation:,.0f} req/s; oha alone on CPU 1, proxy and upstream on CPU 0\n")
    print("| load | proxy | target req/s | held | p50 | p99 | p99.9 | CPU µs/req | oha µs/req |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    order = list(ports.items())
    for share in (0.5, 0.8):
        rate = int(saturation * share)
        rows = {n: [] for n in ports}
        for r in range(args.rounds):
            for name, port in rotated(order, r):
                pids = by_name[name].pids()
                c0 = cpu_seconds(pids)[2]
                reqs, rps, p50, p99, p999, load = run_oha(port, args.seconds, args.connections, rate, tls)
                cpu = (cpu_seconds(pids)[2] - c0) * 1e6 / reqs
                rows[name].append((rps, p50, p99, p999, cpu, load * 1e6 / reqs))
                print(f"{share:.0%} round {r + 1} {name:9} {rps:9,.0f} req/s  p50 {p50:7.0f}us  p99 {p99:7.0f}us  "
                      f"p99.9 {p999:7.0f}us  cpu {cpu:5.1f}us/req  oha {load * 1e6 / reqs:5.1f}us/req",
                      file=sys.stderr)
        for name in [n for n in NAMES if n in rows]:
            rps, p50, p99, p999, cpu, load = [statistics.median(c) for c in zip(*rows[name])]
            print(f"| {share:.0%} | {name} | {rate:,} | {rps / rate:.1%} | {p50:.0f} µs | {p99:.0f} µs "
                  f"| {p999:.0f} µs | {cpu:.1f} | {load:.1f} |")
        sys.stdout.flush()


def measure(args, ports, by_name, scheme, title, close):
    """Interleaved rounds of one workload; prints per-round lines and a median table."""
    results = {n: [] for n in ports}

    def run(port, seconds):
        if args.h2:
            return run_h2load(port, seconds, args.connections // 4)
        return run_wrk(port, seconds, args.connections, scheme, close, spread=args.spread)

    for name, port in ports.items():  # warm up pools and caches
        run(port, 2)
    order = list(ports.items())
    for r in range(args.rounds):
        for name, port in rotated(order, r):
            pids = by_name[name].pids()
            up_pids = by_name["upstream"].pids()
            u0, s0, c0 = cpu_seconds(pids)
            up0 = cpu_seconds(up_pids)[2]
            box0 = box_cpu_seconds()
            reqs, rps, p50, p99, load_cpu = run(port, args.seconds)
            load_us = load_cpu * 1e6 / reqs
            u1, s1, c1 = cpu_seconds(pids)
            box_us = (box_cpu_seconds() - box0) * 1e6 / reqs
            up_us = (cpu_seconds(up_pids)[2] - up0) * 1e6 / reqs
            cpu_us = (c1 - c0) * 1e6 / reqs
            ticks = (u1 - u0) + (s1 - s0)
            user_share = (u1 - u0) / ticks if ticks else 0.0
            user_us = cpu_us * user_share
            sys_us = cpu_us - user_us
            results[name].append((rps, p50, p99, user_us + sys_us, user_us, sys_us, box_us, up_us, load_us))
            print(f"{title}: round {r + 1} {name:9} {rps:10.0f} req/s  p50 {p50:7.0f}us  p99 {p99:7.0f}us  "
                  f"cpu {user_us + sys_us:5.1f}us/req (user {user_us:4.1f}, sys {sys_us:4.1f}), "
                  f"upstream {up_us:5.1f}us/req, load {load_us:5.1f}us/req, whole box {box_us:5.1f}us/req",
                  file=sys.stderr)

    med = {n: [statistics.median(col) for col in zip(*rows)] for n, rows in results.items()}
    peers = [med[n][3] for n in ("nginx", "haproxy") if n in med]
    best_cpu = min(peers) if peers else None
    peers_rps = [med[n][0] for n in ("nginx", "haproxy") if n in med]
    best_rps = max(peers_rps) if peers_rps else None

    def vs(value, best):
        return f"{value / best:.2f}×" if best else "—"

    load = (f"h2load with {args.connections // 4} HTTP/2 connections × 32 streams" if args.h2
            else f"wrk with {args.connections} connections")
    where = ("each proxy on both cores as it ships (shardgate workers = 0, nginx 2 workers, HAProxy "
             "nbthread 2), wrk (2 threads) and upstream sharing them" if args.spread
             else "proxy pinned to CPU 0 (1 worker), load + upstream on CPU 1")
    print(f"\n{scheme}, {title}: {args.rounds} interleaved rounds of {args.seconds}s, {load}, {where}; medians\n")
    # The upstream's and the load generator's CPU per request say whether
    # the proxy makes the rest of the box work harder (the TLS close-per-
    # request workload is bounded by CPU 1, where both run).
    print("| proxy | req/s | vs best peer | p50 | p99 | CPU µs/req | user | sys | CPU vs best peer "
          "| upstream µs/req | load µs/req | whole box µs/req |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in [n for n in NAMES if n in med]:
        rps, p50, p99, cpu, user, system, box, up, load = med[n]
        print(f"| {n} | {rps:,.0f} | {vs(rps, best_rps)} | {p50:.0f} µs | {p99:.0f} µs | {cpu:.1f} | {user:.1f} "
              f"| {system:.1f} | {vs(cpu, best_cpu)} | {up:.1f} | {load:.1f} | {box:.1f} |")
    # Adjacent runs share the machine's state; on a noisy host their ratio is
    # steadier than a ratio of medians taken minutes apart.
    def per_round(label, ours, theirs):
        ratios = sorted(a[3] / b for a, b in zip(ours, theirs))
        print(f"{label} CPU per request, median of per-round ratios: "
              f"{statistics.median(ratios):.3f} (range {ratios[0]:.3f}–{ratios[-1]:.3f})")

    print()
    peer_rounds = [results[n] for n in ("nginx", "haproxy") if n in results]
    if peer_rounds:
        # The better peer of each round, so a round's noise hits both sides.
        best = [min(rows[3] for rows in same_round) for same_round in zip(*peer_rounds)]
        for n in [n for n in ("floor", "baseline", "shardgate") if n in results]:
            per_round(f"{n} / better peer of the round", results[n], best)
    if "baseline" in results and "shardgate" in results:
        per_round("shardgate / baseline", results["shardgate"], [b[3] for b in results["baseline"]])
    sys.stdout.flush()


def job(work, ups, ports, admin, builds, scheme="http", ng_tls="", hap_tls="", sg_tls="", h2=False,
        up_location='return 200 "ok\\n";', ng_extra="", up_extra="", spread=False, floor=None):
    """The same job for every proxy: the upstream's argv, and (name, argv) per proxy.

    Each proxy routes by the hash of `x-shard-key` to one of the `ups` ports
    over pooled keep-alive connections and adds the usual forwarding headers;
    `builds` names the shardgate binaries to run; `floor` is the floor
    proxy's binary (benches/floor_proxy.rs), if it runs. `up_location` is what the
    upstream nginx does with a request (`up_extra`: more of its servers);
    `ng_extra` goes into the proxying nginx's location (benches/bodies.py
    streams large bodies with them).
    """
    tls = bool(ng_tls)
    listen = "\n".join(f"listen 127.0.0.1:{p};" for p in ups)
    up_conf = nginx_conf(work, "upstream", f"""
  server {{ {listen} location / {{ {up_location} }} }}
  {up_extra}""")
    upstream = ["nginx", "-c", up_conf, "-p", work]

    servers = "\n".join(f"server 127.0.0.1:{p};" for p in ups)
    # HTTP/2 clients keep 16 × 32 requests in flight, all to one upstream:
    # an idle pool capped at 64 would close (and later reopen) a connection
    # after most requests. HAProxy keeps every idle connection it opened, so
    # the other two may keep 1,024.
    pool = 1024 if h2 else 64
    ng_conf = nginx_conf(work, "nginx", f"""
  upstream shards {{ hash $http_x_shard_key consistent; {servers} keepalive {pool}; keepalive_requests 10000000; }}
  server {{
    listen 127.0.0.1:{ports['nginx']}{" ssl" if tls else ""}{" http2" if h2 else ""};
    {ng_tls}
    location / {{
      proxy_pass http://shards;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      {ng_extra}
    }}
  }}""", workers=2 if spread else 1)
    proxies = [("nginx", ["nginx", "-c", ng_conf, "-p", work])]

    hap = os.path.join(work, "haproxy.cfg")
    with open(hap, "w") as f:
        f.write(f"""
global
  nbthread {2 if spread else 1}
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option forwardfor
  http-reuse always
frontend fe
  bind 127.0.0.1:{ports['haproxy']}{hap_tls}{" proto h2" if h2 and not hap_tls else ""}
  http-request set-header X-Forwarded-Proto {scheme}
  default_backend shards
backend shards
  balance hdr(x-shard-key)
  hash-type consistent
""" + "".join(f"  server s{i} 127.0.0.1:{p}\n" for i, p in enumerate(ups)))
    proxies.append(("haproxy", ["haproxy", "-f", hap]))

    topo = write_topology(os.path.join(work, "topology.json"), [[p] for p in ups])
    for name, binary in builds:
        sg_conf = os.path.join(work, f"{name}.toml")
        with open(sg_conf, "w") as f:
            f.write(f"""
[server]
listen = "127.0.0.1:{ports[name]}"
admin_listen = "127.0.0.1:{admin[name]}"
workers = {0 if spread else 1}
[topology]
sources = ["{topo}"]
[upstream]
pool_max_idle = {pool}
[log]
level = "warn"
access_log_sample = 0.0
{sg_tls}
{os.environ.get("SHARDGATE_BENCH_EXTRA", "")}
""")
        proxies.append((name, [binary, "proxy", "--config", sg_conf]))
    if floor:
        proxies.append(("floor", [floor] + (["--h2"] if h2 else []) + [f"127.0.0.1:{ports['floor']}"]
                        + [f"127.0.0.1:{p}" for p in ups]))
    return upstream, proxies


class Bench:
    """Ports, builds and a work directory for one side-by-side run of the job."""

    def __init__(self, prefix, binary, baseline=None, floor=None):
        self.work = tempfile.mkdtemp(prefix=prefix)
        self.ups = [free_port() for _ in range(3)]
        self.floor = floor
        names = ["nginx", "haproxy", "shardgate"] + (["baseline"] if baseline else []) + (["floor"] if floor else [])
        self.ports = {x: free_port() for x in names}
        self.admin = {"shardgate": free_port(), "baseline": free_port()}
        self.builds = [("shardgate", binary)] + ([("baseline", baseline)] if baseline else [])

    def job(self, **kw):
        """compare.py's job over these ports: (upstream argv, [(name, argv)])."""
        return job(self.work, self.ups, self.ports, self.admin, self.builds, floor=self.floor, **kw)

    def each_proxy(self, upstream_argv, proxies, only, measure):
        """Start the upstream (CPU 1), then each proxy in turn (CPU 0, one at
        a time): measure(name, pid, port) once it listens, then stop it."""
        upstream = Proc("upstream", upstream_argv, self.work, cpu=1)
        rows = []
        try:
            for p in self.ups:
                wait_port(p)
            for name, argv in proxies:
                if only and name not in only:
                    continue
                proc = Proc(name, argv, self.work, cpu=0)
                try:
                    wait_port(self.ports[name], timeout=30)
                    rows.append(measure(name, proc.p.pid, self.ports[name]))
                finally:
                    proc.stop()
        finally:
            upstream.stop()
        return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/shardgate"))
    ap.add_argument("--only", nargs="*", default=None, help="measure only these proxies (dev iteration)")
    ap.add_argument("--tls", action="store_true", help="terminate TLS at every proxy")
    ap.add_argument("--close", action="store_true",
                    help="also run a new connection per request (always on with --tls)")
    ap.add_argument("--baseline", default=None, help="another shardgate binary to measure beside this one")
    ap.add_argument("--floor", nargs="?", const=FLOOR, default=None,
                    help="also run the floor proxy (benches/floor_proxy.rs; default: its release build)")
    ap.add_argument("--h2", action="store_true", help="clients speak HTTP/2 (h2load, many streams per connection)")
    ap.add_argument("--rate", action="store_true",
                    help="latency at 50 %% and 80 %% of nginx's saturation rate, open loop (oha)")
    ap.add_argument("--spread", action="store_true",
                    help="every proxy on both cores as it ships (shardgate workers = 0), nothing pinned")
    args = ap.parse_args()
    if args.spread and args.h2:
        sys.exit("--spread measures HTTP/1.1 with wrk")
    if args.rate and (args.h2 or args.spread):
        sys.exit("--rate measures HTTP/1.1 (keep-alive, or with --tls a new connection per request), pinned")
    if args.h2 and (args.tls or args.close):
        sys.exit("--h2 measures clear-text HTTP/2 keep-alive only")
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} missing: run cargo build --release first")

    work = tempfile.mkdtemp(prefix="shardgate-compare-")
    ups = [free_port() for _ in range(3)]
    ports = {"nginx": free_port(), "haproxy": free_port(), "shardgate": free_port()}
    if args.baseline:
        ports["baseline"] = free_port()
    if args.floor:
        if args.tls or args.spread:
            sys.exit("--floor measures the clear-text pinned job (HTTP/1.1, or HTTP/2 with --h2)")
        if not os.path.exists(args.floor):
            sys.exit(f"{args.floor} missing: run cargo build --release --example floor_proxy first")
        ports["floor"] = free_port()
    admin = {"shardgate": free_port(), "baseline": free_port()}
    procs = []
    cert = key = combined = None
    if args.tls:
        cert, key = self_signed_cert(work, "bench.test")
        combined = os.path.join(work, "combined.pem")
        with open(combined, "w") as f:
            f.write(open(cert).read() + open(key).read())
    ng_tls = (f"ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3;"
              if args.tls else "")
    hap_tls = f" ssl crt {combined} ssl-min-ver TLSv1.2 alpn h2,http/1.1" if args.tls else ""
    sg_tls = f'[tls]\ncert = "{cert}"\nkey = "{key}"\n' if args.tls else ""
    scheme = "https" if args.tls else "http"
    builds = [("shardgate", args.binary)] + ([("baseline", args.baseline)] if args.baseline else [])
    try:
        upstream, proxies = job(work, ups, ports, admin, builds, scheme, ng_tls, hap_tls, sg_tls, args.h2,
                                spread=args.spread, floor=args.floor)
        # At a fixed rate oha needs a core of its own to hold 80 % of
        # nginx's saturation, so the upstream moves to the proxy's core
        # (saturation is measured in that same layout).
        procs.append(Proc("upstream", upstream, work, cpu=None if args.spread else 0 if args.rate else 1))
        for name, argv in proxies:
            procs.append(Proc(name, argv, work, cpu=None if args.spread else 0))
        for p in list(ports.values()) + ups:
            wait_port(p)

        if args.only:
            ports = {n: p for n, p in ports.items() if n in args.only}
        by_name = {p.name: p for p in procs}
        per_conn = "new TLS connection per request" if args.tls else "new connection per request"
        workloads = [("HTTP/2 keep-alive" if args.h2 else "keep-alive", False)] + ([(per_conn, True)] if args.tls or args.close else [])
        if args.rate:
            measure_rate(args, ports, by_name)
            return
        for title, close in workloads:
            measure(args, ports, by_name, scheme, title, close)
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    main()
