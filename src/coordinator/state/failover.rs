//! Liveness and failover: silent nodes become DEAD, and a dead primary's
//! most caught-up live replica takes its place under the next epoch.

use super::{ClusterState, NodeStatus, Rules};
use crate::clock::Hlc;
use crate::replication::Progress;
use crate::topology::{NodeAddr, Partition};
use std::time::Duration;
use tokio::time::Instant;

/// A partition's health as its nodes' statuses show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionHealth {
    /// The primary is alive.
    Ok,
    /// The primary is dead or unheard, but a replica is alive.
    PrimaryDown,
    /// No node of the partition is alive.
    Unavailable,
}

impl PartitionHealth {
    /// As the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionHealth::Ok => "ok",
            PartitionHealth::PrimaryDown => "primary_down",
            PartitionHealth::Unavailable => "unavailable",
        }
    }
}

/// A replica promoted to primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promotion {
    /// Partition index.
    pub partition: u32,
    /// The dead primary, now fenced.
    pub from: NodeAddr,
    /// The promoted replica.
    pub to: NodeAddr,
    /// The epoch the promotion created.
    pub epoch: u64,
}

/// What a sweep found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Nodes that just became DEAD.
    pub newly_dead: Vec<String>,
    /// Silent nodes the map does not name, forgotten.
    pub forgotten: Vec<String>,
    /// Promotions made, one epoch each.
    pub promotions: Vec<Promotion>,
    /// Partitions that just lost every live node (kept in the map). Reported
    /// once, when it happens, not on every sweep while it lasts.
    pub unavailable: Vec<u32>,
    /// Partitions that had no live node and have one again.
    pub available_again: Vec<u32>,
    /// Partitions whose primary is dead but no replica could take over.
    pub stuck: Vec<u32>,
    /// Partitions whose primary is dead and whose best replica is further
    /// behind it than `failover_max_lag`, with how far: left waiting.
    pub too_far_behind: Vec<(u32, Duration)>,
}

impl ClusterState {
    /// The newest write the node at `addr` last reported applied, to this
    /// coordinator or (`stored`) to any other.
    fn applied(&self, addr: &NodeAddr, stored: &dyn Fn(&NodeAddr) -> Option<Progress>) -> Hlc {
        self.nodes
            .values()
            .filter(|n| n.addr == *addr)
            .filter_map(|n| n.replication.map(|r| r.applied))
            .chain(stored(addr).map(|p| p.applied))
            .max()
            .unwrap_or(Hlc::ZERO)
    }

    /// Whether the node at `addr` is alive (ACTIVE or DEGRADED); a node the
    /// map names but nobody has heard from is alive until the startup grace ends.
    fn alive(&self, addr: &NodeAddr, now: Instant, timeout: Duration) -> Option<NodeStatus> {
        let node = self
            .nodes
            .values()
            .filter(|n| n.addr == *addr)
            .max_by_key(|n| n.last_seen);
        match node {
            Some(n)
                if n.last_seen.is_some()
                    || now.saturating_duration_since(self.started) < timeout =>
            {
                (n.status != NodeStatus::Dead).then_some(n.status)
            }
            Some(_) => None,
            None if now.saturating_duration_since(self.started) < timeout => {
                Some(NodeStatus::Active)
            }
            None => None,
        }
    }

    /// Mark silent nodes DEAD and promote replicas of dead primaries (the
    /// leader only). `stored` gives how far a node had got as a shared store
    /// recorded it, when known.
    pub fn sweep(
        &mut self,
        now: Instant,
        rules: &Rules,
        stored: &dyn Fn(&NodeAddr) -> Option<Progress>,
    ) -> SweepReport {
        let mut report = SweepReport::default();
        let timeout = rules.heartbeat_timeout;
        let grace_over = now.saturating_duration_since(self.started) >= timeout;
        for n in self.nodes.values_mut() {
            let silent = match n.last_seen {
                Some(t) => now.saturating_duration_since(t) > timeout,
                None => grace_over,
            };
            if silent && n.status != NodeStatus::Dead {
                n.status = NodeStatus::Dead;
                report.newly_dead.push(n.id.clone());
            }
        }
        // A stranger silent for twice the timeout is forgotten, so forged or
        // departed node ids cannot pile up; one that returns registers again.
        let named = &self.named;
        self.nodes.retain(|id, n| {
            let long_silent = n.last_seen.map_or(grace_over, |t| {
                now.saturating_duration_since(t) > 2 * timeout
            });
            let forget = !named.contains(&n.addr) && n.status == NodeStatus::Dead && long_silent;
            if forget {
                report.forgotten.push(id.clone());
            }
            !forget
        });
        let mut unavailable = std::collections::BTreeSet::new();

        // Decide on the map as it stood when the sweep began; each promotion
        // then raises the epoch by one.
        let mut decided = Vec::new();
        for p in self.map.partitions() {
            if self.alive(&p.primary, now, timeout).is_some() {
                continue;
            }
            let mut candidates: Vec<(usize, NodeAddr)> = p
                .replicas
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, r)| {
                    self.alive(r, now, timeout) == Some(NodeStatus::Active)
                        && !self.fenced.contains(r)
                })
                .collect();
            // Most caught-up first: the newest applied write the replica
            // reported in its heartbeat (with `majority` writes, that replica
            // holds every acknowledged one); then the store's lag where known;
            // then map order.
            candidates.sort_by_key(|(i, r)| {
                (
                    std::cmp::Reverse(self.applied(r, stored)),
                    stored(r).map_or(u64::MAX, |p| p.lag_bytes),
                    *i,
                )
            });
            // The CP choice: a best replica that far behind the dead primary
            // is kept out, and so the partition waits rather than lose writes.
            if let (Some(max), Some(&(_, best))) = (rules.failover_max_lag, candidates.first()) {
                let primary = self.applied(&p.primary, stored);
                let behind = self.applied(&best, stored).behind(primary);
                if primary != Hlc::ZERO && behind > max {
                    report.too_far_behind.push((p.index, behind));
                    continue;
                }
            }
            let Some(&(_, to)) = candidates.first() else {
                if p.replicas
                    .iter()
                    .all(|r| self.alive(r, now, timeout).is_none())
                {
                    unavailable.insert(p.index);
                } else {
                    report.stuck.push(p.index);
                }
                continue;
            };
            let held = self
                .last_failover
                .get(&p.index)
                .is_some_and(|t| now.saturating_duration_since(*t) < rules.failover_hold_down);
            if held {
                report.stuck.push(p.index);
                continue;
            }
            decided.push((p.index, p.primary, to));
        }
        report.unavailable = unavailable.difference(&self.unavailable).copied().collect();
        report.available_again = self.unavailable.difference(&unavailable).copied().collect();
        self.unavailable = unavailable;
        for (partition, from, to) in decided {
            match self.map.promote(partition, to) {
                Ok(map) => {
                    self.set_map(map);
                    self.fenced.insert(from);
                    self.last_failover.insert(partition, now);
                    report.promotions.push(Promotion {
                        partition,
                        from,
                        to,
                        epoch: self.map.epoch(),
                    });
                }
                // Only an exhausted epoch refuses a promotion decided on this
                // map; keeping the map in force is the safe side.
                Err(e) => {
                    tracing::error!(partition, "failover refused: {e}");
                    report.stuck.push(partition);
                }
            }
        }
        report
    }

    /// Whether `p` can take writes, and if not, whether it can serve reads.
    pub fn health(&self, p: &Partition) -> PartitionHealth {
        let live = |a: &NodeAddr| {
            matches!(
                self.status_of(a),
                Some(NodeStatus::Active | NodeStatus::Degraded)
            )
        };
        if live(&p.primary) {
            PartitionHealth::Ok
        } else if p.replicas.iter().any(live) {
            PartitionHealth::PrimaryDown
        } else {
            PartitionHealth::Unavailable
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;
    use crate::clock::Hlc;
    use crate::replication::Progress;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_silent_primary_dies_and_its_first_active_replica_is_promoted_once() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        tokio::time::advance(10 * SEC).await;
        all_beat(&mut s, &["a"]);
        tokio::time::advance(6 * SEC).await;
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(r.newly_dead, ["a"]);
        assert_eq!(r.promotions.len(), 1);
        let p = &r.promotions[0];
        assert_eq!(
            (p.partition, p.to.to_string().as_str(), p.epoch),
            (0, "10.0.0.2:80", 8)
        );
        assert_eq!(s.epoch(), 8, "one epoch per promotion");
        let part = &s.map().partitions()[0];
        assert_eq!(part.primary.to_string(), "10.0.0.2:80");
        assert_eq!(part.replicas.len(), 1, "the old primary left the partition");
        // A second sweep changes nothing.
        let again = s.sweep(Instant::now(), &rules(), &no_lag);
        assert!(again.promotions.is_empty());
        assert_eq!(s.epoch(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn the_least_lagged_active_replica_is_preferred() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        tokio::time::advance(16 * SEC).await;
        all_beat(&mut s, &["a"]);
        let lag = |r: &NodeAddr| match r.to_string().as_str() {
            "10.0.0.2:80" => Some(lag_bytes(5000)),
            "10.0.0.3:80" => Some(lag_bytes(10)),
            _ => None,
        };
        let r = s.sweep(Instant::now(), &rules(), &lag);
        assert_eq!(r.promotions[0].to.to_string(), "10.0.0.3:80");
    }

    #[tokio::test(start_paused = true)]
    async fn the_replica_that_applied_the_newest_write_is_promoted_whatever_the_stores_lag() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        tokio::time::advance(16 * SEC).await;
        all_beat(&mut s, &["a"]);
        for (id, addr, applied) in [("b", "10.0.0.2:80", 900), ("c", "10.0.0.3:80", 100)] {
            let mut h = hb(id, addr, 0);
            h.replication = Some(ReplicationReport {
                role: crate::replication::Role::Replica,
                applied: crate::clock::Hlc::new(applied, 0),
                ..Default::default()
            });
            s.heartbeat(&h, Instant::now(), 1_000_000, &rules())
                .unwrap();
        }
        // The store's lag says the opposite; what the replicas applied wins.
        let lag = |r: &NodeAddr| match r.to_string().as_str() {
            "10.0.0.2:80" => Some(lag_bytes(5000)),
            "10.0.0.3:80" => Some(lag_bytes(10)),
            _ => None,
        };
        let r = s.sweep(Instant::now(), &rules(), &lag);
        assert_eq!(r.promotions[0].to.to_string(), "10.0.0.2:80");
    }

    fn lag_bytes(lag_bytes: u64) -> Progress {
        Progress {
            applied: Hlc::ZERO,
            lag_bytes,
        }
    }

    /// Partition 0's primary a reported `primary_ms`, its replicas b and c
    /// `b_ms` and `c_ms`, then a went silent.
    async fn primary_dies_ahead_of_its_replicas(
        primary_ms: u64,
        b_ms: u64,
        c_ms: u64,
    ) -> ClusterState {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        for (id, addr, applied, role) in [
            (
                "a",
                "10.0.0.1:80",
                primary_ms,
                crate::replication::Role::Primary,
            ),
            ("b", "10.0.0.2:80", b_ms, crate::replication::Role::Replica),
            ("c", "10.0.0.3:80", c_ms, crate::replication::Role::Replica),
        ] {
            let mut h = hb(id, addr, 0);
            h.replication = Some(ReplicationReport {
                role,
                applied: Hlc::new(applied, 0),
                ..Default::default()
            });
            s.heartbeat(&h, Instant::now(), 1_000_000, &rules())
                .unwrap();
        }
        tokio::time::advance(16 * SEC).await;
        all_beat(&mut s, &["a"]);
        s
    }

    #[tokio::test(start_paused = true)]
    async fn consistent_failover_keeps_a_replica_too_far_behind_out_and_the_partition_waits() {
        let mut s = primary_dies_ahead_of_its_replicas(60_000, 40_000, 30_000).await;
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert!(r.promotions.is_empty(), "{r:?}");
        assert_eq!(r.too_far_behind, [(0, 20 * SEC)]);
        assert_eq!(s.epoch(), 7, "the map stays as it is");
    }

    #[tokio::test(start_paused = true)]
    async fn consistent_failover_promotes_a_replica_within_the_bound() {
        let mut s = primary_dies_ahead_of_its_replicas(60_000, 58_000, 30_000).await;
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(r.promotions[0].to.to_string(), "10.0.0.2:80");
        assert!(r.too_far_behind.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn available_failover_promotes_the_best_replica_however_far_behind() {
        let mut s = primary_dies_ahead_of_its_replicas(60_000, 40_000, 30_000).await;
        let ap = Rules {
            failover_max_lag: None,
            ..rules()
        };
        let r = s.sweep(Instant::now(), &ap, &no_lag);
        assert_eq!(r.promotions[0].to.to_string(), "10.0.0.2:80");
    }

    #[tokio::test(start_paused = true)]
    async fn progress_another_coordinator_recorded_counts_toward_the_choice() {
        let mut s = primary_dies_ahead_of_its_replicas(60_000, 40_000, 30_000).await;
        // c heartbeats to another coordinator, which recorded it caught up.
        let stored = |a: &NodeAddr| {
            (a.to_string() == "10.0.0.3:80").then_some(Progress {
                applied: Hlc::new(60_000, 0),
                lag_bytes: 0,
            })
        };
        let r = s.sweep(Instant::now(), &rules(), &stored);
        assert_eq!(r.promotions[0].to.to_string(), "10.0.0.3:80");
    }

    #[tokio::test(start_paused = true)]
    async fn no_promotion_ping_pong_within_the_hold_down() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        tokio::time::advance(16 * SEC).await;
        all_beat(&mut s, &["a"]);
        assert_eq!(
            s.sweep(Instant::now(), &rules(), &no_lag).promotions.len(),
            1
        );
        // The promoted node dies right away; c is alive but the partition is held.
        tokio::time::advance(10 * SEC).await;
        all_beat(&mut s, &["a", "b"]);
        tokio::time::advance(6 * SEC).await;
        all_beat(&mut s, &["a", "b"]);
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert!(r.promotions.is_empty());
        assert_eq!(r.stuck, [0]);
        tokio::time::advance(15 * SEC).await;
        all_beat(&mut s, &["a", "b"]);
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(
            r.promotions.len(),
            1,
            "after the hold-down the next replica takes over"
        );
        assert_eq!(s.epoch(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_strangers_are_forgotten_and_the_maps_nodes_are_not() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        beat(&mut s, "stray", "10.9.9.9:80");
        tokio::time::advance(16 * SEC).await;
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert!(r.forgotten.is_empty(), "dead, but not yet for long");
        tokio::time::advance(15 * SEC).await;
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(r.forgotten, ["stray"]);
        assert!(
            s.nodes().any(|n| n.id == "a"),
            "the map's nodes stay, dead or not"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_whose_every_node_died_is_kept_and_reported() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        tokio::time::advance(16 * SEC).await;
        all_beat(&mut s, &["d", "e"]);
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(r.unavailable, [1]);
        assert!(r.promotions.is_empty());
        assert_eq!(s.map().partitions().len(), 2);
        assert_eq!(s.epoch(), 7);
        all_beat(&mut s, &["d", "e"]);
        let again = s.sweep(Instant::now(), &rules(), &no_lag);
        assert!(
            again.unavailable.is_empty(),
            "reported once, not every sweep"
        );
        beat(&mut s, "e", "10.0.1.2:80");
        let back = s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(back.available_again, [1]);
    }

    #[tokio::test(start_paused = true)]
    async fn degraded_replicas_are_not_promoted() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        tokio::time::advance(16 * SEC).await;
        beat(&mut s, "e", "10.0.1.2:80");
        s.heartbeat(
            &hb("b", "10.0.0.2:80", 500),
            Instant::now(),
            1_000_000,
            &rules(),
        )
        .unwrap();
        beat(&mut s, "c", "10.0.0.3:80");
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        let p0 = r.promotions.iter().find(|p| p.partition == 0).unwrap();
        assert_eq!(p0.to.to_string(), "10.0.0.3:80");
    }

    #[tokio::test(start_paused = true)]
    async fn nodes_never_heard_get_a_startup_grace() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        tokio::time::advance(5 * SEC).await;
        beat(&mut s, "b", "10.0.0.2:80");
        assert!(
            s.sweep(Instant::now(), &rules(), &no_lag)
                .promotions
                .is_empty()
        );
        tokio::time::advance(11 * SEC).await;
        beat(&mut s, "b", "10.0.0.2:80");
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(
            r.promotions.len(),
            1,
            "a never-heard primary is dead after the grace"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn partition_health_follows_its_nodes_statuses() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        let p0 = s.map().partitions()[0].clone();
        assert_eq!(s.health(&p0), PartitionHealth::Ok);
        tokio::time::advance(16 * SEC).await;
        all_beat(&mut s, &["a", "b", "c"]);
        // Mark the silent ones dead without promoting (the replicas are silent too).
        s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(s.health(&p0), PartitionHealth::Unavailable);
        beat(&mut s, "c", "10.0.0.3:80");
        assert_eq!(s.health(&p0), PartitionHealth::PrimaryDown);
        assert_eq!(s.status_of(&"10.0.0.9:80".parse().unwrap()), None);
    }
}
