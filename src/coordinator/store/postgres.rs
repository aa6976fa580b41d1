//! PostgreSQL store: several coordinators share one database.
//!
//! - Migrations are versioned files applied at start-up, serialised by an
//!   advisory lock so coordinators starting together do not race.
//! - One coordinator leads: the one holding a session advisory lock on its own
//!   connection. If it dies, the server drops the lock and another takes it.
//! - Every map change is one transaction that compares and sets the epoch, so
//!   a stale leader's promotion loses and two primaries can never be written.
//! - Heartbeats are written over a few dedicated connections with
//!   `synchronous_commit = off`: a PostgreSQL crash may lose the last fraction
//!   of a second of heartbeat history (the next heartbeat rewrites it), never a
//!   map change, promotion or fencing, which commit synchronously.
//! - Every connection is re-established when the server drops it, so a
//!   database restart costs failed calls, not a coordinator restart.

use super::{Commit, RemoteNode, SharedStore, Store, StoreError};
use crate::clock::Hlc;
use crate::coordinator::state::{
    Assignment, Heartbeat, NodeStatus, Persisted, PersistedNode, ReplicationRow,
};
use crate::replication::Progress;
use crate::topology::{NodeAddr, PartitionDoc, TopologyDoc};
use arc_swap::ArcSwapOption;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

/// The versioned migrations, in order.
pub fn migrations() -> &'static [(i32, &'static str, &'static str)] {
    &[
        (
            1,
            "spec_schema",
            include_str!("../../../migrations/0001_spec_schema.sql"),
        ),
        (
            2,
            "shardgate_state",
            include_str!("../../../migrations/0002_shardgate_state.sql"),
        ),
        (
            3,
            "replication_progress",
            include_str!("../../../migrations/0003_replication_progress.sql"),
        ),
    ]
}

/// Advisory lock key serialising migrations.
const MIGRATE_KEY: i64 = 0x5348_4152_4447_0001;
/// Advisory lock key held by the leading coordinator.
const LEADER_KEY: i64 = 0x5348_4152_4447_0002;

async fn connect(url: &str) -> Result<Client, StoreError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

/// Connections heartbeats are spread over. Commits on one backend are
/// serial; a few backends let PostgreSQL group their WAL writes.
const HEARTBEAT_CONNECTIONS: usize = 4;

/// Records one heartbeat. Three statements, one round trip: the name moves
/// with the node if it changed address, the address row is upserted, history
/// is appended.
const RECORD_HEARTBEAT: &str = "WITH released AS (
    UPDATE cluster_nodes SET node_name = NULL WHERE node_name = $1 AND ip_address <> $2
), up AS (
    INSERT INTO cluster_nodes (ip_address, node_name, node_status, cpu_utilization,
                               memory_free_bytes, active_connections, clock_skew_ms, last_heartbeat_at)
    VALUES ($2, $1, $3, $4::float8::numeric(5,2), $5, $6, $7, NOW())
    ON CONFLICT (ip_address) DO UPDATE SET
      node_name = EXCLUDED.node_name, node_status = EXCLUDED.node_status,
      cpu_utilization = EXCLUDED.cpu_utilization, memory_free_bytes = EXCLUDED.memory_free_bytes,
      active_connections = EXCLUDED.active_connections, clock_skew_ms = EXCLUDED.clock_skew_ms,
      last_heartbeat_at = NOW()
    RETURNING node_id)
INSERT INTO node_heartbeats (node_id, response_time_ms, system_load_status)
SELECT node_id, $8, $9 FROM up";

/// A live connection and the heartbeat statement prepared on it, so the hot
/// write is not parsed and planned again each time.
struct Session {
    client: Client,
    heartbeat: tokio_postgres::Statement,
}

/// One connection, re-established on first use after the server dropped it.
struct Conn {
    url: String,
    /// Run once on every new session.
    setup: &'static str,
    session: ArcSwapOption<Session>,
    reconnect: Mutex<()>,
}

impl Session {
    async fn start(client: Client, setup: &str) -> Result<Session, StoreError> {
        if !setup.is_empty() {
            client.batch_execute(setup).await?;
        }
        let heartbeat = client.prepare(RECORD_HEARTBEAT).await?;
        Ok(Session { client, heartbeat })
    }
}

impl Conn {
    fn new(url: &str, setup: &'static str) -> Conn {
        Conn {
            url: url.to_owned(),
            setup,
            session: ArcSwapOption::empty(),
            reconnect: Mutex::new(()),
        }
    }

    /// A live session, connecting if there is none.
    async fn get(&self) -> Result<Arc<Session>, StoreError> {
        if let Some(s) = self.session.load_full().filter(|s| !s.client.is_closed()) {
            return Ok(s);
        }
        // One caller reconnects; the others wait and take its session.
        let _one = self.reconnect.lock().await;
        if let Some(s) = self.session.load_full().filter(|s| !s.client.is_closed()) {
            return Ok(s);
        }
        let client = connect(&self.url).await?;
        let s = Arc::new(Session::start(client, self.setup).await?);
        self.session.store(Some(s.clone()));
        Ok(s)
    }
}

/// A coordinator's handle on the shared database.
pub struct PgStore {
    url: String,
    /// Reads, registrations and claims; synchronous commit.
    main: Conn,
    /// Heartbeat writes, chosen by node id so one node's heartbeats stay in order.
    heartbeats: Vec<Conn>,
    /// Holds the leader lock for as long as it is open.
    leader_conn: Mutex<Option<Client>>,
    leading: AtomicBool,
    leader_id: String,
}

impl PgStore {
    /// Connect and bring the schema up to date.
    pub async fn connect(url: &str, leader_id: &str) -> Result<PgStore, StoreError> {
        let mut client = connect(url).await?;
        migrate(&mut client).await?;
        let main = Conn::new(url, "");
        main.session
            .store(Some(Arc::new(Session::start(client, "").await?)));
        Ok(PgStore {
            url: url.to_owned(),
            main,
            heartbeats: (0..HEARTBEAT_CONNECTIONS)
                .map(|_| Conn::new(url, "SET synchronous_commit = off"))
                .collect(),
            leader_conn: Mutex::new(None),
            leading: AtomicBool::new(false),
            leader_id: leader_id.to_owned(),
        })
    }

    fn heartbeat_conn(&self, node_id: &str) -> &Conn {
        let lane = xxhash_rust::xxh3::xxh3_64(node_id.as_bytes()) as usize % self.heartbeats.len();
        &self.heartbeats[lane]
    }
}

/// Apply every migration not yet applied, each in its own transaction.
pub(super) async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version INT PRIMARY KEY, name TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW())",
        )
        .await?;
    for &(version, name, sql) in migrations() {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_KEY])
            .await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[&version],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&version, &name],
            )
            .await?;
            tracing::info!(version, name, "applied migration");
        }
        tx.commit().await?;
    }
    Ok(())
}

fn addr(s: &str) -> Result<NodeAddr, StoreError> {
    s.parse()
        .map_err(|e| StoreError::Data(format!("bad address {s:?} in cluster_nodes: {e}")))
}

impl Store for PgStore {
    type Shared = PgStore;

    fn shared(&self) -> Option<&PgStore> {
        Some(self)
    }

    async fn load(&self) -> Result<Option<Persisted>, StoreError> {
        let Some(state) = self
            .main
            .get()
            .await?
            .client
            .query_opt(
                "SELECT cluster_epoch, master_node_id FROM cluster_state",
                &[],
            )
            .await?
        else {
            return Ok(None);
        };
        let epoch: i64 = state.get(0);
        let master: String = state.get(1);
        let rows = self
            .main
            .get()
            .await?
            .client
            .query(
                "SELECT dp.partition_index, pn.ip_address,
                        ARRAY(SELECT cn.ip_address FROM unnest(dp.replica_node_ids) WITH ORDINALITY AS r(id, ord)
                              JOIN cluster_nodes cn ON cn.node_id = r.id ORDER BY r.ord)::text[],
                        dp.hash_range_start, dp.hash_range_end
                   FROM data_partitions dp JOIN cluster_nodes pn ON pn.node_id = dp.primary_node_id
                  ORDER BY dp.partition_index",
                &[],
            )
            .await?;
        let partitions: Vec<PartitionDoc> = rows
            .iter()
            .map(|r| PartitionDoc {
                partition_index: r.get::<_, i32>(0) as u32,
                primary_node_ip: r.get(1),
                replica_node_ips: r.get(2),
                hash_range_start: r.get(3),
                hash_range_end: r.get(4),
            })
            .collect();
        let nodes = self
            .main
            .get()
            .await?
            .client
            .query(
                "SELECT node_name, ip_address, told_partition, told_primary, fenced FROM cluster_nodes",
                &[],
            )
            .await?;
        let mut fenced = BTreeSet::new();
        let mut persisted_nodes = Vec::new();
        for r in &nodes {
            let ip = addr(r.get(1))?;
            if r.get::<_, bool>(4) {
                fenced.insert(ip);
            }
            if let Some(id) = r.get::<_, Option<String>>(0) {
                let told = r.get::<_, Option<bool>>(3).map(|primary| Assignment {
                    partition: r.get::<_, Option<i32>>(2).map(|p| p as u32),
                    primary,
                });
                persisted_nodes.push(PersistedNode { id, addr: ip, told });
            }
        }
        Ok(Some(Persisted {
            map: TopologyDoc {
                cluster_epoch: epoch as u64,
                master_node_id: master,
                partition_count: partitions.len() as u32,
                partitions,
            },
            fenced,
            nodes: persisted_nodes,
        }))
    }

    async fn commit(&self, expected: Option<u64>, state: &Persisted) -> Result<Commit, StoreError> {
        // A dedicated connection: a transaction must not interleave with other
        // statements on the shared client.
        let mut client = connect(&self.url).await?;
        let tx = client.transaction().await?;
        let current: Option<i64> = tx
            .query_opt("SELECT cluster_epoch FROM cluster_state FOR UPDATE", &[])
            .await?
            .map(|r| r.get(0));
        if current.map(|e| e as u64) != expected {
            tx.rollback().await?;
            return Ok(Commit::Lost);
        }
        if current.is_none() {
            // Two coordinators initialising an empty database: the row's
            // primary key lets exactly one insert win.
            let inserted = tx
                .execute(
                    "INSERT INTO cluster_state (cluster_epoch, master_node_id) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                    &[&(state.map.cluster_epoch as i64), &self.leader_id],
                )
                .await?;
            if inserted == 0 {
                tx.rollback().await?;
                return Ok(Commit::Lost);
            }
        }
        let map = &state.map;
        let addresses: Vec<String> = map
            .partitions
            .iter()
            .flat_map(|p| {
                std::iter::once(p.primary_node_ip.clone()).chain(p.replica_node_ips.iter().cloned())
            })
            .collect();
        tx.execute(
            "INSERT INTO cluster_nodes (ip_address, memory_free_bytes)
             SELECT a, 0 FROM unnest($1::text[]) AS a ON CONFLICT (ip_address) DO NOTHING",
            &[&addresses],
        )
        .await?;
        let primaries: Vec<String> = map
            .partitions
            .iter()
            .map(|p| p.primary_node_ip.clone())
            .collect();
        tx.execute(
            "UPDATE cluster_nodes SET node_role = CASE WHEN ip_address = ANY($1) THEN 'MASTER' ELSE 'WORKER' END
              WHERE node_role <> 'ARBITER'",
            &[&primaries],
        )
        .await?;
        let fenced: Vec<String> = state.fenced.iter().map(ToString::to_string).collect();
        tx.execute(
            "UPDATE cluster_nodes SET fenced = (ip_address = ANY($1))",
            &[&fenced],
        )
        .await?;
        let indexes: Vec<i32> = map
            .partitions
            .iter()
            .map(|p| p.partition_index as i32)
            .collect();
        tx.execute(
            "DELETE FROM data_partitions WHERE NOT (partition_index = ANY($1))",
            &[&indexes],
        )
        .await?;
        for p in &map.partitions {
            tx.execute(
                "INSERT INTO data_partitions (partition_index, primary_node_id, replica_node_ids, hash_range_start, hash_range_end)
                 VALUES ($1, (SELECT node_id FROM cluster_nodes WHERE ip_address = $2),
                         ARRAY(SELECT cn.node_id FROM unnest($3::text[]) WITH ORDINALITY AS r(ip, ord)
                               JOIN cluster_nodes cn ON cn.ip_address = r.ip ORDER BY r.ord),
                         $4, $5)
                 ON CONFLICT (partition_index) DO UPDATE SET
                   primary_node_id = EXCLUDED.primary_node_id, replica_node_ids = EXCLUDED.replica_node_ids,
                   hash_range_start = EXCLUDED.hash_range_start, hash_range_end = EXCLUDED.hash_range_end",
                &[
                    &(p.partition_index as i32),
                    &p.primary_node_ip,
                    &p.replica_node_ips,
                    &p.hash_range_start,
                    &p.hash_range_end,
                ],
            )
            .await?;
        }
        tx.execute(
            "UPDATE cluster_state SET cluster_epoch = $1, master_node_id = $2, updated_at = NOW()",
            &[&(map.cluster_epoch as i64), &self.leader_id],
        )
        .await?;
        tx.commit().await?;
        Ok(Commit::Won)
    }

    async fn save_replication(&self, rows: &[ReplicationRow]) -> Result<(), StoreError> {
        // One statement for every pair; the addresses are cluster_nodes'
        // unique key (the map's nodes are rows from the first commit on).
        let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let sources: Vec<String> = rows.iter().map(|r| r.source_addr.to_string()).collect();
        let targets: Vec<String> = rows.iter().map(|r| r.target_addr.to_string()).collect();
        let states: Vec<&str> = rows.iter().map(|r| r.report.state.as_str()).collect();
        let lag_bytes: Vec<i64> = rows.iter().map(|r| big(r.report.lag_bytes)).collect();
        let lag_ms: Vec<i64> = rows.iter().map(|r| big(r.report.lag_ms)).collect();
        let seqs: Vec<i64> = rows.iter().map(|r| big(r.report.sequence)).collect();
        let hlcs: Vec<i64> = rows
            .iter()
            .map(|r| big(r.report.applied.as_u64()))
            .collect();
        let parts: Vec<i32> = rows
            .iter()
            .map(|r| i32::try_from(r.partition).unwrap_or(i32::MAX))
            .collect();
        self.main
            .get()
            .await?
            .client
            .execute(
                "INSERT INTO replication_logs (source_node_id, target_node_id, replication_status,
                        replication_lag_bytes, replication_lag_ms, last_replicated_sequence,
                        applied_hlc, partition_index, updated_at)
                 SELECT s.node_id, t.node_id, r.state, r.lag_bytes, r.lag_ms, r.seq, r.hlc, r.part, NOW()
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[],
                               $6::int8[], $7::int8[], $8::int4[])
                        AS r(src, tgt, state, lag_bytes, lag_ms, seq, hlc, part)
                   JOIN cluster_nodes s ON s.ip_address = r.src
                   JOIN cluster_nodes t ON t.ip_address = r.tgt
                 ON CONFLICT (source_node_id, target_node_id) DO UPDATE SET
                        replication_status = EXCLUDED.replication_status,
                        replication_lag_bytes = EXCLUDED.replication_lag_bytes,
                        replication_lag_ms = EXCLUDED.replication_lag_ms,
                        last_replicated_sequence = EXCLUDED.last_replicated_sequence,
                        applied_hlc = EXCLUDED.applied_hlc,
                        partition_index = EXCLUDED.partition_index,
                        updated_at = EXCLUDED.updated_at",
                &[
                    &sources, &targets, &states, &lag_bytes, &lag_ms, &seqs, &hlcs, &parts,
                ],
            )
            .await?;
        Ok(())
    }

    async fn save_nodes(&self, state: &Persisted) -> Result<(), StoreError> {
        // Registrations arrive with heartbeats; what remains is a first
        // contact's assignment, written only where none was recorded. One
        // statement for every node: a round trip per node made each first
        // contact cost O(nodes) waits.
        let (mut addrs, mut partitions, mut primaries) = (Vec::new(), Vec::new(), Vec::new());
        for n in &state.nodes {
            if let Some(told) = n.told {
                addrs.push(n.addr.to_string());
                partitions.push(told.partition.map(|p| p as i32));
                primaries.push(told.primary);
            }
        }
        if addrs.is_empty() {
            return Ok(());
        }
        self.main
            .get()
            .await?
            .client
            .execute(
                "UPDATE cluster_nodes cn SET told_partition = t.partition, told_primary = t.primary_
                   FROM unnest($1::text[], $2::int4[], $3::bool[]) AS t(ip, partition, primary_)
                  WHERE cn.ip_address = t.ip AND cn.told_primary IS NULL",
                &[&addrs, &partitions, &primaries],
            )
            .await?;
        Ok(())
    }
}

impl SharedStore for PgStore {
    /// The leader's session (and with it the advisory lock) goes.
    async fn resign(&self) {
        *self.leader_conn.lock().await = None;
        self.leading.store(false, Ordering::SeqCst);
    }

    async fn record_heartbeat(
        &self,
        hb: &Heartbeat,
        status: NodeStatus,
        skew_ms: i64,
        handling: Duration,
    ) -> Result<(), StoreError> {
        let ip = hb.addr.to_string();
        let load = serde_json::json!({
            "cpuPercent": hb.usage.cpu_percent,
            "freeMemoryBytes": hb.usage.free_memory_bytes,
            "activeConnections": hb.usage.active_connections,
            "nodeTimeMs": hb.node_time_ms,
        });
        let cpu = hb.usage.cpu_percent.clamp(0.0, 999.99);
        let conn = self.heartbeat_conn(&hb.node_id).get().await?;
        conn.client
            .execute(
                &conn.heartbeat,
                &[
                    &hb.node_id,
                    &ip,
                    &status.as_str(),
                    &cpu,
                    &hb.usage.free_memory_bytes,
                    &hb.usage.active_connections,
                    &skew_ms,
                    &(handling.as_millis().min(i32::MAX as u128) as i32),
                    &load,
                ],
            )
            .await
            .map_err(|e| {
                // A concurrent rename of the same node may collide on node_name;
                // the next heartbeat repairs it.
                tracing::debug!(error = %e, "heartbeat upsert failed");
                e
            })?;
        Ok(())
    }

    async fn claim_told(&self, node: &str, a: Assignment) -> Result<bool, StoreError> {
        let partition = a.partition.map(|p| p as i32);
        let changed = self
            .main
            .get()
            .await?
            .client
            .execute(
                "UPDATE cluster_nodes SET told_partition = $2, told_primary = $3
                  WHERE node_name = $1 AND told_primary IS NOT NULL
                    AND (told_primary IS DISTINCT FROM $3 OR told_partition IS DISTINCT FROM $2)",
                &[&node, &partition, &a.primary],
            )
            .await?;
        Ok(changed == 1)
    }

    async fn lead(&self) -> Result<bool, StoreError> {
        let mut conn = self.leader_conn.lock().await;
        if let Some(c) = conn.as_ref() {
            if !c.is_closed() && c.simple_query("SELECT 1").await.is_ok() {
                return Ok(self.leading.load(Ordering::SeqCst));
            }
            *conn = None;
            self.leading.store(false, Ordering::SeqCst);
        }
        let c = match conn.take() {
            Some(c) => c,
            None => connect(&self.url).await?,
        };
        let got: bool = c
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_KEY])
            .await?
            .get(0);
        self.leading.store(got, Ordering::SeqCst);
        if got {
            *conn = Some(c);
        }
        Ok(got)
    }

    async fn remote_nodes(&self) -> Result<Vec<RemoteNode>, StoreError> {
        let rows = self
            .main
            .get()
            .await?
            .client
            .query(
                "SELECT node_name, ip_address, EXTRACT(EPOCH FROM (NOW() - last_heartbeat_at))::float8,
                        cpu_utilization::float8, memory_free_bytes, active_connections, clock_skew_ms
                   FROM cluster_nodes WHERE node_name IS NOT NULL",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(RemoteNode {
                    id: r.get(0),
                    addr: addr(r.get(1))?,
                    age: Duration::from_secs_f64(r.get::<_, f64>(2).max(0.0)),
                    usage: crate::coordinator::state::Usage {
                        cpu_percent: r.get(3),
                        free_memory_bytes: r.get(4),
                        active_connections: r.get(5),
                    },
                    skew_ms: r.get(6),
                })
            })
            .collect()
    }

    async fn replication_progress(&self) -> Result<Vec<(NodeAddr, Progress)>, StoreError> {
        let rows = self
            .main
            .get()
            .await?
            .client
            .query(
                "SELECT DISTINCT ON (rl.target_node_id) cn.ip_address, rl.applied_hlc,
                        rl.replication_lag_bytes
                   FROM replication_logs rl JOIN cluster_nodes cn ON cn.node_id = rl.target_node_id
                  ORDER BY rl.target_node_id, rl.updated_at DESC",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    addr(r.get(0))?,
                    Progress {
                        applied: Hlc::from_u64(r.get::<_, i64>(1).max(0) as u64),
                        lag_bytes: r.get::<_, i64>(2).max(0) as u64,
                    },
                ))
            })
            .collect()
    }

    async fn prune(&self, retention: Duration) -> Result<u64, StoreError> {
        Ok(self
            .main
            .get()
            .await?
            .client
            .execute(
                "DELETE FROM node_heartbeats WHERE created_at < NOW() - make_interval(secs => $1)",
                &[&retention.as_secs_f64()],
            )
            .await?)
    }

    async fn mark_dead(&self, ids: &[String]) -> Result<(), StoreError> {
        self.main
            .get()
            .await?
            .client
            .execute(
                "UPDATE cluster_nodes SET node_status = 'DEAD' WHERE node_name = ANY($1)",
                &[&ids],
            )
            .await?;
        Ok(())
    }
}
