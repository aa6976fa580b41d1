#!/usr/bin/env python3
"""The training run for the profile-guided release build (scripts/build-release).

It drives an instrumented shardgate binary through what shardgate does in
production, so the compiler learns which branches are hot and lays the code
out for them. The data plane gets the weight: keyed reads and writes over
keep-alive HTTP/1.1 with the key in a header, the path or the query, bodies,
replica reads, HTTP/2, a connection per request, a few client errors, then
the same over TLS. The control plane gets two real failovers (coordinator,
agents heartbeating over gRPC, a promotion, the proxy following the map), so
its code is profiled too instead of being treated as never run.

Profiles go to OUT_DIR/data-plane and OUT_DIR/control-plane (one .profraw per
process, written when it exits), so scripts/build-release can weight them.
Every load step must succeed; a step that fails aborts the build, because a
profile of errors would optimise the wrong paths.

Usage: python3 benches/pgo_workload.py [--smoke] INSTRUMENTED_BINARY OUT_DIR
--smoke runs every step briefly against any build (scripts/test does, so the
training run cannot rot unnoticed between releases).
Needs: nginx, wrk, nghttp2-client (h2load), openssl. Talks only to
127.0.0.1; every load step is bounded in time or count; stops what it starts
by PID.
"""

import os
import re
import subprocess
import sys
import tempfile
import urllib.request

import failover
from benchlib import free_port, self_signed_cert, wait_port, write_topology
from compare import Proc, nginx_conf

# Keys rotate over many values so every partition and both nodes of each are used.
HEADER_KEYS = """
local i = 0
request = function()
  i = i + 1
  wrk.headers["x-shard-key"] = "user:" .. (i % 997)
  if i % 5 == 0 then wrk.headers["x-read-preference"] = "secondaryPreferred"
  else wrk.headers["x-read-preference"] = nil end
  return wrk.format("GET", "/kv/any")
end
"""
PATH_KEYS = """
local i = 0
request = function()
  i = i + 1
  if i % 2 == 0 then return wrk.format("GET", "/kv/order:" .. (i % 991)) end
  return wrk.format("GET", "/items?key=item:" .. (i % 983) .. "&fields=all")
end
"""
WRITES = """
local i = 0
local body = string.rep("v", 1024)
request = function()
  i = i + 1
  wrk.headers["x-shard-key"] = "user:" .. (i % 997)
  wrk.headers["content-type"] = "application/octet-stream"
  if i % 3 == 0 then return wrk.format("DELETE", "/kv/any") end
  return wrk.format(i % 3 == 1 and "PUT" or "POST", "/kv/any", nil, body)
end
"""


def run(argv, timeout=120):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout).stdout


def wrk(url, seconds, script=None, connections=64, extra=()):
    """Run wrk; fail unless every response was a 2xx and nothing errored."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", *extra]
    if script:
        argv += ["-s", script]
    out = run(argv + [url])
    done = re.search(r"(\d+) requests in", out)
    if not done or int(done.group(1)) == 0 or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk {url} did not succeed cleanly:\n{out}")
    return int(done.group(1))


def h2load(url, n, expect="2xx", extra=()):
    """Run h2load (HTTP/2 unless --h1 is passed); fail unless all `n` answered with status class `expect`."""
    out = run(["h2load", "-n", str(n), "-c", "8", "-m", "8", *extra, url])
    codes = re.search(r"status codes: (.*)", out)
    if f"{n} done" not in out or not codes or f"{n} {expect}" not in codes.group(1):
        raise RuntimeError(f"h2load {url} did not answer {n} x {expect}:\n{out}")
    return n


def proxy_config(work, name, port, admin, topo, tls=""):
    path = os.path.join(work, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f'[server]\nlisten = "127.0.0.1:{port}"\nadmin_listen = "127.0.0.1:{admin}"\nworkers = 1\n'
                f'[topology]\nsources = ["{topo}"]\n[log]\nlevel = "warn"\naccess_log_sample = 0.0\n{tls}')
    return path


def data_plane(binary, work, env, scale):
    """Keyed traffic through one plain and one TLS proxy, against an nginx upstream.

    `scale` shortens every step (1.0 for training, small for --smoke).
    """
    secs = lambda s: max(1, round(s * scale))
    count = lambda n: max(100, int(n * scale))
    nodes = [free_port() for _ in range(6)]
    listen = "\n".join(f"listen 127.0.0.1:{p};" for p in nodes)
    upstream = Proc("upstream", ["nginx", "-c", nginx_conf(work, "upstream", f"""
  server {{ {listen} client_max_body_size 1m; location / {{ return 200 "ok\\n"; }} }}"""), "-p", work], work)
    topo = write_topology(os.path.join(work, "topology.json"), [nodes[i:i + 2] for i in (0, 2, 4)])
    scripts = {}
    for name, text in (("header", HEADER_KEYS), ("path", PATH_KEYS), ("writes", WRITES)):
        scripts[name] = os.path.join(work, f"{name}.lua")
        with open(scripts[name], "w") as f:
            f.write(text)
    cert, key = self_signed_cert(work, "train.test")
    try:
        for p in nodes:
            wait_port(p)
        for scheme, tls in (("http", ""), ("https", f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')):
            port, admin = free_port(), free_port()
            cfg = proxy_config(work, f"proxy-{scheme}", port, admin, topo, tls)
            proxy = subprocess.Popen([binary, "proxy", "--config", cfg], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"{scheme}.log"), "w"))
            try:
                wait_port(port, timeout=60)
                base = f"{scheme}://127.0.0.1:{port}"
                n = wrk(base + "/", secs(6 if scheme == "http" else 3), scripts["header"])
                n += wrk(base + "/", secs(2), scripts["path"])
                n += wrk(base + "/", secs(3 if scheme == "http" else 2), scripts["writes"], connections=16)
                n += wrk(base + "/kv/user:1", 1, connections=8, extra=["-H", "Connection: close"])
                n += h2load(base + "/kv/user:2", count(20000))
                n += h2load(base + "/kv/user:3", count(2000), extra=["--h1"])
                # Client errors are part of real traffic: no key, and an ambiguous one.
                n += h2load(base + "/", count(500), "4xx", extra=["--h1"])
                n += h2load(base + "/?key=a&key=b", count(500), "4xx", extra=["--h1"])
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
                    r.read()
                print(f"pgo_workload: {scheme}: {n} requests", file=sys.stderr)
            finally:
                proxy.terminate()
                if proxy.wait(30) != 0:
                    raise RuntimeError(f"the {scheme} proxy exited with {proxy.returncode}; no profile written")
    finally:
        upstream.stop()


def control_plane(binary, env):
    """Two real failovers, one with the failover buffer on."""
    for buffering in (False, True):
        row = failover.one_round(binary, buffering, env)
        print(f"pgo_workload: failover (buffering {buffering}): {row}", file=sys.stderr)


def main():
    args = sys.argv[1:]
    smoke = args[:1] == ["--smoke"]
    args = args[1:] if smoke else args
    if len(args) != 2:
        sys.exit("usage: pgo_workload.py [--smoke] INSTRUMENTED_BINARY OUT_DIR")
    binary, out = os.path.abspath(args[0]), os.path.abspath(args[1])
    work = tempfile.mkdtemp(prefix="shardgate-pgo-")

    def profile_env(kind):
        os.makedirs(os.path.join(out, kind), exist_ok=True)
        return dict(os.environ, LLVM_PROFILE_FILE=os.path.join(out, kind, "shardgate-%p-%m.profraw"))

    data_plane(binary, work, profile_env("data-plane"), 0.05 if smoke else 1.0)
    control_plane(binary, profile_env("control-plane"))
    subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
