# Sourced by scripts/test and scripts/with-stores: throwaway stores in
# temporary directories on free loopback ports, stopped (by PID file or PID)
# when the calling script exits. Needs scripts/lib/packages.sh first.

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

STORES_CLEANUP=()
stop_stores() {
  local c
  for c in "${STORES_CLEANUP[@]}"; do eval "$c"; done
}
trap stop_stores EXIT

as_pg() {
  # initdb and postgres refuse to run as root.
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# A PostgreSQL cluster; exports SHARDGATE_TEST_PG (its admin URL) and PG_DIR.
start_throwaway_pg() {
  PG_BIN=$(pg_bin)
  PG_DIR=$(mktemp -d /tmp/shardgate-pg.XXXXXX)
  chmod 755 "$PG_DIR"
  [ "$(id -u)" -eq 0 ] && chown postgres "$PG_DIR"
  local port
  port=$(free_port)
  STORES_CLEANUP+=("as_pg '$PG_BIN/pg_ctl' -D '$PG_DIR/data' -m immediate stop >/dev/null 2>&1 || true; rm -rf '$PG_DIR'")
  as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U shardgate --auth=trust -E UTF8 --no-sync >/dev/null
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w \
    -o "-h 127.0.0.1 -p $port -k $PG_DIR -c fsync=off -c synchronous_commit=off -c max_connections=400" \
    start >/dev/null
  export SHARDGATE_TEST_PG="postgres://shardgate@127.0.0.1:$port/postgres"
}

# A three-member etcd cluster; exports SHARDGATE_BENCH_ETCD (etcd://...).
start_throwaway_etcd() {
  local dir i cluster="" hosts="" pids=()
  dir=$(mktemp -d /tmp/shardgate-etcd.XXXXXX)
  local client=() peer=()
  for i in 0 1 2; do client+=("$(free_port)"); peer+=("$(free_port)"); done
  for i in 0 1 2; do cluster+="${cluster:+,}m$i=http://127.0.0.1:${peer[$i]}"; done
  for i in 0 1 2; do
    etcd --name "m$i" --data-dir "$dir/m$i" \
      --listen-client-urls "http://127.0.0.1:${client[$i]}" --advertise-client-urls "http://127.0.0.1:${client[$i]}" \
      --listen-peer-urls "http://127.0.0.1:${peer[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${peer[$i]}" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token shardgate \
      >"$dir/m$i.log" 2>&1 &
    pids+=("$!")
    hosts+="${hosts:+,}127.0.0.1:${client[$i]}"
  done
  STORES_CLEANUP+=("kill ${pids[*]} 2>/dev/null || true; wait ${pids[*]} 2>/dev/null || true; rm -rf '$dir'")
  for i in 0 1 2; do
    for _ in $(seq 100); do
      curl -fsS "http://127.0.0.1:${client[$i]}/health" 2>/dev/null | grep -q '"true"' && break
      sleep 0.1
    done
  done
  export SHARDGATE_BENCH_ETCD="etcd://$hosts"
}
