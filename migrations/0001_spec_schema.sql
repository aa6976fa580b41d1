-- The schema of SPEC §4, exactly. Later migrations only add.
CREATE TABLE cluster_nodes (
    node_id           UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    ip_address        VARCHAR(45) NOT NULL UNIQUE,
    node_role         VARCHAR(32) NOT NULL DEFAULT 'WORKER',   -- MASTER, WORKER, ARBITER
    node_status       VARCHAR(32) NOT NULL DEFAULT 'ACTIVE',   -- ACTIVE, DEGRADED, DEAD
    cpu_utilization   DECIMAL(5,2) NOT NULL DEFAULT 0.00,
    memory_free_bytes BIGINT NOT NULL,
    last_heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX idx_nodes_status ON cluster_nodes (node_status, last_heartbeat_at);

CREATE TABLE node_heartbeats (
    heartbeat_id       BIGSERIAL PRIMARY KEY,
    node_id            UUID NOT NULL REFERENCES cluster_nodes ON DELETE CASCADE,
    response_time_ms   INT NOT NULL,
    system_load_status JSONB NOT NULL,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX idx_heartbeats_lookup ON node_heartbeats (node_id, created_at DESC);

CREATE TABLE replication_logs (
    log_id                   BIGSERIAL PRIMARY KEY,
    source_node_id           UUID NOT NULL REFERENCES cluster_nodes,
    target_node_id           UUID NOT NULL REFERENCES cluster_nodes,
    replication_status       VARCHAR(32) NOT NULL DEFAULT 'IN_SYNC', -- IN_SYNC, LAGGING, STALLED
    replication_lag_bytes    BIGINT NOT NULL DEFAULT 0,
    last_replicated_sequence BIGINT NOT NULL,
    updated_at               TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX idx_replication_status ON replication_logs (replication_status, replication_lag_bytes DESC);

CREATE TABLE data_partitions (
    partition_id     UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    partition_index  INT NOT NULL UNIQUE,
    primary_node_id  UUID NOT NULL REFERENCES cluster_nodes,
    replica_node_ids UUID[] NOT NULL,
    hash_range_start VARCHAR(64) NOT NULL,
    hash_range_end   VARCHAR(64) NOT NULL
);
CREATE INDEX idx_partitions_range ON data_partitions (hash_range_start, hash_range_end);
