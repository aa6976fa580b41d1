-- Additions shardgate needs beyond SPEC §4 (columns added, none removed).
--
-- cluster_nodes holds one row per node address (the SPEC's unique key); a
-- node's stable string id is the heartbeat's node_id, kept in node_name.
ALTER TABLE cluster_nodes ADD COLUMN node_name TEXT UNIQUE;
ALTER TABLE cluster_nodes ADD COLUMN active_connections BIGINT NOT NULL DEFAULT 0;
ALTER TABLE cluster_nodes ADD COLUMN clock_skew_ms BIGINT NOT NULL DEFAULT 0;
-- Told to TERMINATE: an old primary replaced by a promotion, or a node dropped from the map.
ALTER TABLE cluster_nodes ADD COLUMN fenced BOOLEAN NOT NULL DEFAULT FALSE;
-- The assignment the node last heard (NULL: never heard); REBALANCE goes out
-- when the map's assignment differs, exactly once, by compare-and-set.
ALTER TABLE cluster_nodes ADD COLUMN told_partition INT;
ALTER TABLE cluster_nodes ADD COLUMN told_primary BOOLEAN;

-- The cluster epoch and the leading coordinator: one row. Every change to
-- data_partitions happens in a transaction that compares and sets this epoch.
CREATE TABLE cluster_state (
    singleton      BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    cluster_epoch  BIGINT NOT NULL,
    master_node_id TEXT NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
