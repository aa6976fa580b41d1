//! Hosts in network namespaces, for partitions that cut some links and not
//! others (what a TCP relay cannot do when several dialers share an address).
//!
//! Each host is a namespace with one address, `10.<net>.<i>.2`, joined by a
//! veth pair to a hub namespace that routes between them. A partition is a
//! policy-routing rule in the hub (`prohibit`: refused at once, as a
//! firewall that rejects; `blackhole`: dropped, as a dead link), so only the
//! named pairs are cut. Processes run in a host with `ip netns exec`, and the
//! test's own clients run on a thread moved into the host's namespace.
//! Everything is removed when the `Net` is dropped. Needs root (scripts/test
//! runs as root).

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// How a cut link fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Refused at once (ICMP administratively prohibited).
    Reject,
    /// Silently dropped: peers find out by their own timeouts.
    Drop,
}

impl Cut {
    fn rule(self) -> &'static str {
        match self {
            Cut::Reject => "prohibit",
            Cut::Drop => "blackhole",
        }
    }
}

/// A set of hosts joined by a hub.
pub(crate) struct Net {
    hub: String,
    hosts: Vec<(String, String, Ipv4Addr)>,
    cuts: std::sync::Mutex<Vec<(Ipv4Addr, Ipv4Addr, Cut)>>,
    runtimes: std::sync::Mutex<Vec<(String, tokio::runtime::Handle)>>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// Hosts named `names`, all reachable from each other.
    pub(crate) fn create(names: &[&str]) -> Net {
        Net::try_create(names).unwrap_or_else(|e| {
            panic!("network namespaces are needed for this test (run as root, as scripts/test does): {e}")
        })
    }

    fn try_create(names: &[&str]) -> Result<Net, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let seq = N.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("sg{}-{seq}", std::process::id());
        // A /24 per host under a /16 per net: one octet from the pid and
        // sequence, so parallel tests never share addresses (nor could they:
        // each net is its own set of namespaces).
        let octet = ((std::process::id() + seq * 37) % 200 + 20) as u8;
        let net = Net {
            hub: format!("{prefix}-hub"),
            hosts: names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    (
                        (*n).to_owned(),
                        format!("{prefix}-{n}"),
                        Ipv4Addr::new(10, octet, i as u8 + 1, 2),
                    )
                })
                .collect(),
            cuts: Default::default(),
            runtimes: Default::default(),
        };
        ip(&["netns", "add", &net.hub])?;
        ip(&["-n", &net.hub, "link", "set", "lo", "up"])?;
        let forward = Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.hub,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .status()
            .map_err(|e| e.to_string())?;
        if !forward.success() {
            return Err("cannot enable forwarding in the hub".into());
        }
        for (i, (_, ns, addr)) in net.hosts.iter().enumerate() {
            let o = addr.octets();
            let gw = format!("{}.{}.{}.1", o[0], o[1], o[2]);
            let port = format!("h{i}");
            ip(&["netns", "add", ns])?;
            ip(&[
                "link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", &port,
                "netns", &net.hub,
            ])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n",
                &net.hub,
                "addr",
                "add",
                &format!("{gw}/24"),
                "dev",
                &port,
            ])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &net.hub, "link", "set", &port, "up"])?;
            ip(&["-n", ns, "route", "add", "default", "via", &gw])?;
        }
        Ok(net)
    }

    fn host(&self, name: &str) -> &(String, String, Ipv4Addr) {
        self.hosts
            .iter()
            .find(|h| h.0 == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// The host's address.
    pub(crate) fn ip(&self, name: &str) -> Ipv4Addr {
        self.host(name).2
    }

    /// The host's namespace, for `ip netns exec`.
    pub(crate) fn ns(&self, name: &str) -> &str {
        &self.host(name).1
    }

    /// Cut `name` off from each of `others`, both ways.
    pub(crate) fn isolate(&self, name: &str, others: &[&str], how: Cut) {
        let a = self.ip(name);
        let mut cuts = self.cuts.lock().unwrap();
        for o in others {
            let b = self.ip(o);
            for (from, to) in [(a, b), (b, a)] {
                self.rule("add", from, to, how);
                cuts.push((from, to, how));
            }
        }
    }

    /// Remove every cut.
    pub(crate) fn heal(&self) {
        let mut cuts = self.cuts.lock().unwrap();
        for (from, to, how) in cuts.drain(..) {
            self.rule("del", from, to, how);
        }
    }

    /// Add or delete the hub's rule for packets `from` → `to`.
    fn rule(&self, verb: &str, from: Ipv4Addr, to: Ipv4Addr, how: Cut) {
        let (from, to) = (from.to_string(), to.to_string());
        ip(&[
            "-n",
            &self.hub,
            "rule",
            verb,
            "from",
            &from,
            "to",
            &to,
            how.rule(),
        ])
        .unwrap();
    }

    /// A runtime whose one thread lives in host `name`'s namespace: every
    /// socket a task on it opens is that host's.
    pub(crate) fn runtime(&self, name: &str) -> tokio::runtime::Handle {
        let mut rts = self.runtimes.lock().unwrap();
        if let Some((_, h)) = rts.iter().find(|(n, _)| n == name) {
            return h.clone();
        }
        let path = format!("/run/netns/{}", self.ns(name));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            tx.send(rt.handle().clone()).unwrap();
            // Runs the tasks spawned onto it until the process ends.
            rt.block_on(std::future::pending::<()>());
        });
        let handle = rx.recv().unwrap();
        rts.push((name.to_owned(), handle.clone()));
        handle
    }

    /// Run `fut` on host `name` and wait for its result.
    pub(crate) async fn on<F>(&self, name: &str, fut: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime(name).spawn(fut).await.unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (_, ns, _) in &self.hosts {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["netns", "del", &self.hub]);
    }
}
