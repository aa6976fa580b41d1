"""Helpers the benchmark scripts share: loopback ports only."""

import json
import os
import signal
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    """An ephemeral port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=15):
    """Poll until something accepts on 127.0.0.1:port, or raise after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port}")


def self_signed_cert(work, name):
    """An ECDSA P-256 certificate for `name` and 127.0.0.1, made with openssl: (cert, key) paths."""
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def write_topology(path, partitions, epoch=1):
    """A shard map splitting the hash space evenly; `partitions` lists each one's ports, primary first."""
    n = len(partitions)
    bounds = [(i * 2**32 // n + (1 if i else 0), (i + 1) * 2**32 // n if i < n - 1 else 2**32 - 1)
              for i in range(n)]
    with open(path, "w") as f:
        json.dump({"clusterEpoch": epoch, "masterNodeId": "bench", "partitionCount": n, "partitions": [
            {"partitionIndex": i, "primaryNodeIp": f"127.0.0.1:{ports[0]}",
             "replicaNodeIps": [f"127.0.0.1:{p}" for p in ports[1:]],
             "hashRangeStart": f"{start:08x}", "hashRangeEnd": f"{end:08x}"}
            for i, (ports, (start, end)) in enumerate(zip(partitions, bounds))]}, f)
    return path


def stop_all(procs, directory):
    """SIGTERM `procs` (newest first), wait for them (SIGKILL after 10 s),
    then remove `directory`: a bench's cluster torn down by PID."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    subprocess.run(["rm", "-rf", directory])
