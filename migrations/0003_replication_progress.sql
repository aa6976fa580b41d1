-- Replication as the nodes report it (SPEC §7). replication_logs keeps one
-- current row per (primary, replica) pair, upserted at most once a second by
-- each coordinator from the heartbeats it heard; a new primary starts new
-- rows and the old pair's row stays as history until pruned. The applied HLC
-- lets a leader rank replicas that heartbeat to another coordinator.
ALTER TABLE replication_logs ADD COLUMN replication_lag_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE replication_logs ADD COLUMN applied_hlc BIGINT NOT NULL DEFAULT 0;
ALTER TABLE replication_logs ADD COLUMN partition_index INT;
CREATE UNIQUE INDEX replication_logs_pair ON replication_logs (source_node_id, target_node_id);
