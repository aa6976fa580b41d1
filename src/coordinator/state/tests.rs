//! The state machine's unit tests and the fixtures its other modules' tests share.

use super::*;

pub(super) const SEC: Duration = Duration::from_secs(1);

pub(super) fn rules() -> Rules {
    Rules {
        heartbeat_timeout: 15 * SEC,
        max_clock_skew: Duration::from_millis(100),
        failover_hold_down: 30 * SEC,
        max_strangers: 3,
        failover_max_lag: Some(5 * SEC),
    }
}

pub(super) fn map() -> ShardMap {
    let text = r#"{"clusterEpoch":7,"masterNodeId":"x","partitionCount":2,"partitions":[
        {"partitionIndex":0,"primaryNodeIp":"10.0.0.1:80","replicaNodeIps":["10.0.0.2:80","10.0.0.3:80"],
         "hashRangeStart":"00000000","hashRangeEnd":"7fffffff"},
        {"partitionIndex":1,"primaryNodeIp":"10.0.1.1:80","replicaNodeIps":["10.0.1.2:80"],
         "hashRangeStart":"80000000","hashRangeEnd":"ffffffff"}]}"#;
    ShardMap::from_json(text.as_bytes()).unwrap()
}

pub(super) fn hb(id: &str, addr: &str, skew_ms: i64) -> Heartbeat {
    Heartbeat {
        node_id: id.into(),
        addr: addr.parse().unwrap(),
        node_time_ms: 1_000_000 + skew_ms,
        usage: Usage::default(),
        replication: None,
    }
}

pub(super) fn beat(s: &mut ClusterState, id: &str, addr: &str) -> Command {
    try_beat(s, id, addr).unwrap()
}

pub(super) fn try_beat(s: &mut ClusterState, id: &str, addr: &str) -> Result<Command, Refusal> {
    s.heartbeat(&hb(id, addr, 0), Instant::now(), 1_000_000, &rules())
        .map(|(c, _)| c)
}

pub(super) fn all_beat(s: &mut ClusterState, except: &[&str]) {
    for (id, addr) in [
        ("a", "10.0.0.1:80"),
        ("b", "10.0.0.2:80"),
        ("c", "10.0.0.3:80"),
        ("d", "10.0.1.1:80"),
        ("e", "10.0.1.2:80"),
    ] {
        if !except.contains(&id) {
            beat(s, id, addr);
        }
    }
}

pub(super) fn no_lag(_: &NodeAddr) -> Option<crate::replication::Progress> {
    None
}

#[tokio::test(start_paused = true)]
async fn heartbeats_register_nodes_and_continue() {
    let mut s = ClusterState::new(map(), "coord", Instant::now());
    let (cmd, persist) = s
        .heartbeat(
            &hb("a", "10.0.0.1:80", 0),
            Instant::now(),
            1_000_000,
            &rules(),
        )
        .unwrap();
    assert_eq!((cmd, persist), (Command::Continue, true));
    assert_eq!(beat(&mut s, "a", "10.0.0.1:80"), Command::Continue);
    let (cmd, persist) = s
        .heartbeat(
            &hb("stranger", "10.9.9.9:80", 0),
            Instant::now(),
            1_000_000,
            &rules(),
        )
        .unwrap();
    assert_eq!(
        (cmd, persist),
        (Command::Continue, false),
        "a stranger is not persisted"
    );
    let stranger = s.nodes().find(|n| n.id == "stranger").unwrap();
    assert_eq!(stranger.told.unwrap().role(), "WORKER");
    assert_eq!(stranger.told.unwrap().partition, None);
    assert!(s.persisted().nodes.iter().all(|n| n.id != "stranger"));
}

#[tokio::test(start_paused = true)]
async fn a_node_and_its_address_are_bound_once_known() {
    let mut s = ClusterState::new(map(), "coord", Instant::now());
    beat(&mut s, "a", "10.0.0.1:80");
    beat(&mut s, "b", "10.0.0.2:80");
    assert!(matches!(
        try_beat(&mut s, "a", "10.0.0.9:80"),
        Err(Refusal::IdBound { .. })
    ));
    assert!(matches!(
        try_beat(&mut s, "forger", "10.0.0.2:80"),
        Err(Refusal::AddressBound { .. })
    ));
    let a = s.nodes().find(|n| n.id == "a").unwrap();
    assert_eq!(
        a.addr.to_string(),
        "10.0.0.1:80",
        "the refusal changed nothing"
    );
    assert!(s.nodes().all(|n| n.id != "forger"));
    // Once an operator's map moves the node, it may follow.
    let mut doc = s.doc();
    doc.partitions[0].primary_node_ip = "10.0.0.9:80".into();
    doc.cluster_epoch = 8;
    s.replace_map(doc).unwrap();
    assert_eq!(beat(&mut s, "a", "10.0.0.9:80"), Command::Continue);
}

#[tokio::test(start_paused = true)]
async fn strangers_are_bounded_but_the_maps_nodes_always_get_in() {
    let mut s = ClusterState::new(map(), "coord", Instant::now());
    for i in 0..3 {
        beat(&mut s, &format!("s{i}"), &format!("10.9.0.{i}:80"));
    }
    assert!(matches!(
        try_beat(&mut s, "s3", "10.9.0.3:80"),
        Err(Refusal::TooManyStrangers { max: 3, .. })
    ));
    assert_eq!(
        beat(&mut s, "s0", "10.9.0.0:80"),
        Command::Continue,
        "known ones carry on"
    );
    assert_eq!(beat(&mut s, "d", "10.0.1.1:80"), Command::Continue);
}

#[tokio::test(start_paused = true)]
async fn skewed_clocks_degrade_a_node() {
    let mut s = ClusterState::new(map(), "coord", Instant::now());
    s.heartbeat(
        &hb("a", "10.0.0.1:80", 250),
        Instant::now(),
        1_000_000,
        &rules(),
    )
    .unwrap();
    let a = s.nodes().next().unwrap();
    assert_eq!(a.status, NodeStatus::Degraded);
    assert_eq!(a.skew_ms, 250);
    s.heartbeat(
        &hb("a", "10.0.0.1:80", -50),
        Instant::now(),
        1_000_000,
        &rules(),
    )
    .unwrap();
    assert_eq!(s.nodes().next().unwrap().status, NodeStatus::Active);
}

#[tokio::test(start_paused = true)]
async fn the_promoted_node_hears_rebalance_once_and_the_old_primary_terminate() {
    let mut s = ClusterState::new(map(), "coord", Instant::now());
    all_beat(&mut s, &[]);
    tokio::time::advance(16 * SEC).await;
    all_beat(&mut s, &["a"]);
    s.sweep(Instant::now(), &rules(), &no_lag);
    assert_eq!(beat(&mut s, "b", "10.0.0.2:80"), Command::Rebalance);
    assert_eq!(beat(&mut s, "b", "10.0.0.2:80"), Command::Continue);
    assert_eq!(
        beat(&mut s, "c", "10.0.0.3:80"),
        Command::Continue,
        "c's role did not change"
    );
    assert_eq!(beat(&mut s, "a", "10.0.0.1:80"), Command::Terminate);
    assert_eq!(
        beat(&mut s, "a", "10.0.0.1:80"),
        Command::Terminate,
        "fenced stays fenced"
    );
}

#[tokio::test(start_paused = true)]
async fn operator_maps_must_raise_the_epoch_and_fence_dropped_nodes() {
    let mut s = ClusterState::new(map(), "coord", Instant::now());
    let mut doc = s.doc();
    doc.partitions[1].replica_node_ips = vec!["10.0.1.9:80".into()];
    for stale in [3, 7] {
        doc.cluster_epoch = stale;
        assert!(matches!(
            s.replace_map(doc.clone()),
            Err(MapChangeError::Stale { in_force: 7, .. })
        ));
    }
    doc.cluster_epoch = 8;
    assert_eq!(s.replace_map(doc.clone()).unwrap(), 8);
    assert!(s.is_fenced(&"10.0.1.2:80".parse().unwrap()));
    doc.cluster_epoch = 100;
    assert_eq!(s.replace_map(doc.clone()).unwrap(), 100);
    for huge in [MAX_EPOCH, u64::MAX] {
        doc.cluster_epoch = huge;
        assert!(matches!(
            s.replace_map(doc.clone()),
            Err(MapChangeError::OutOfRange(_))
        ));
    }
    let kept = s.persisted();
    let mut bad = s.doc();
    bad.cluster_epoch = 101;
    bad.partition_count = 9;
    assert!(matches!(
        s.replace_map(bad),
        Err(MapChangeError::Invalid(_))
    ));
    // The HTTP handler changes the state in place, so a refusal must not
    // have touched it.
    assert_eq!(s.persisted(), kept);
}

#[tokio::test(start_paused = true)]
async fn undoing_an_unconfirmed_map_change_keeps_the_heartbeats_heard_while_the_store_was_asked() {
    let mut s = ClusterState::new(map(), "coord", Instant::now());
    all_beat(&mut s, &[]);
    // The change drops c (fenced) and is in force while the store is asked.
    let before = s.map_in_force();
    let mut doc = s.doc();
    doc.partitions[0].replica_node_ips.pop();
    doc.cluster_epoch = 8;
    s.replace_map(doc).unwrap();
    assert!(s.is_fenced(&"10.0.0.3:80".parse().unwrap()));
    // The store takes most of a heartbeat timeout to refuse; the nodes beat
    // meanwhile.
    tokio::time::advance(14 * SEC).await;
    all_beat(&mut s, &[]);
    s.undo_map_change(before);
    assert_eq!(s.epoch(), 7);
    assert!(!s.is_fenced(&"10.0.0.3:80".parse().unwrap()));
    // Past the timeout counted from before the change, not from the beats.
    tokio::time::advance(2 * SEC).await;
    let report = s.sweep(Instant::now(), &rules(), &no_lag);
    assert!(report.newly_dead.is_empty(), "{:?}", report.newly_dead);
    assert!(s.nodes().all(|n| n.status == NodeStatus::Active));
}
