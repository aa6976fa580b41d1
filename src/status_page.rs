//! The HTML status pages (SPEC §10): `GET /` on the proxy's admin listener
//! and on the coordinator's HTTP listener. Server-rendered, no script, no
//! external asset, refreshed by the browser every few seconds, readable on a
//! phone. Both planes describe what they know in the types here, and this
//! module draws it; it never reads either plane's state itself.

use crate::topology::TopologyDoc;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// How many recent map changes a page lists.
const KEPT: usize = 20;

/// Partition colours on the ring (repeating past eight).
const COLOURS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f",
];

/// One change of the map in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The new epoch.
    pub epoch: u64,
    /// When, Unix milliseconds.
    pub at_unix_ms: u64,
    /// What changed, in words.
    pub what: String,
}

/// The recent changes of the map in force, newest first.
#[derive(Debug, Default)]
pub struct Changes(Mutex<VecDeque<Change>>);

impl Changes {
    /// The map went from `old` (if any) to `new`.
    pub fn record(&self, old: Option<&TopologyDoc>, new: &TopologyDoc) {
        let what = old.map_or_else(|| "first map".to_owned(), |o| describe(o, new));
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.push_front(Change {
            epoch: new.cluster_epoch,
            at_unix_ms,
            what,
        });
        kept.truncate(KEPT);
    }

    /// Newest first.
    pub fn list(&self) -> Vec<Change> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// What changed between two maps, in words: primaries that moved (a
/// failover or a switchover), partitions added or removed, else "map updated".
pub fn describe(old: &TopologyDoc, new: &TopologyDoc) -> String {
    let mut parts = Vec::new();
    for p in &new.partitions {
        match old
            .partitions
            .iter()
            .find(|o| o.partition_index == p.partition_index)
        {
            Some(o) if o.primary_node_ip != p.primary_node_ip => parts.push(format!(
                "partition {}: primary {} → {}",
                p.partition_index, o.primary_node_ip, p.primary_node_ip
            )),
            Some(o)
                if o.hash_range_start != p.hash_range_start
                    || o.hash_range_end != p.hash_range_end =>
            {
                parts.push(format!(
                    "partition {}: range {}–{}",
                    p.partition_index, p.hash_range_start, p.hash_range_end
                ));
            }
            Some(_) => {}
            None => parts.push(format!("partition {} added", p.partition_index)),
        }
    }
    for o in &old.partitions {
        if !new
            .partitions
            .iter()
            .any(|p| p.partition_index == o.partition_index)
        {
            parts.push(format!("partition {} removed", o.partition_index));
        }
    }
    if parts.is_empty() {
        "map updated (members)".into()
    } else {
        parts.join("; ")
    }
}

/// Escape text for HTML.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One table cell: its text, and a class that colours it (`ok`, `warn`, `bad`).
pub struct Cell {
    /// The text.
    pub text: String,
    /// The class, if the cell is a health signal.
    pub class: Option<&'static str>,
}

impl Cell {
    /// A plain cell.
    pub fn plain(text: impl Into<String>) -> Cell {
        Cell {
            text: text.into(),
            class: None,
        }
    }

    /// A cell coloured by health.
    pub fn health(text: impl Into<String>, class: &'static str) -> Cell {
        Cell {
            text: text.into(),
            class: Some(class),
        }
    }
}

/// A page being written.
pub struct Page {
    html: String,
}

impl Page {
    /// A page titled `title`, refreshing itself every `refresh_secs`.
    pub fn new(title: &str, refresh_secs: u32) -> Page {
        let mut html = String::with_capacity(16 * 1024);
        let _ = write!(
            html,
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <meta http-equiv=\"refresh\" content=\"{refresh_secs}\">\
             <title>{}</title><style>{STYLE}</style></head><body><h1>{}</h1>",
            esc(title),
            esc(title)
        );
        Page { html }
    }

    /// A line of key facts: `(label, value)` pairs.
    pub fn facts(&mut self, facts: &[(&str, String)]) {
        self.html.push_str("<p class=\"facts\">");
        for (k, v) in facts {
            let _ = write!(
                self.html,
                "<span><b>{}</b> <span id=\"{}\">{}</span></span>",
                esc(k),
                esc(&k.to_lowercase().replace(' ', "-")),
                esc(v)
            );
        }
        self.html.push_str("</p>");
    }

    /// A section heading.
    pub fn heading(&mut self, text: &str) {
        let _ = write!(self.html, "<h2>{}</h2>", esc(text));
    }

    /// The hash ring as a bar of ranges coloured by partition.
    pub fn ring(&mut self, map: &TopologyDoc) {
        self.html.push_str("<div class=\"ring\" id=\"ring\">");
        let mut parts: Vec<_> = map.partitions.iter().collect();
        parts.sort_by(|a, b| a.hash_range_start.cmp(&b.hash_range_start));
        for p in parts {
            let start = u32::from_str_radix(&p.hash_range_start, 16).unwrap_or(0);
            let end = u32::from_str_radix(&p.hash_range_end, 16).unwrap_or(u32::MAX);
            let share = (f64::from(end) - f64::from(start) + 1.0) / 4_294_967_296.0 * 100.0;
            let colour = COLOURS[p.partition_index as usize % COLOURS.len()];
            let _ = write!(
                self.html,
                "<div class=\"range\" style=\"width:{share:.3}%;background:{colour}\" \
                 title=\"partition {i}: {s}–{e}, primary {pr}\" data-partition=\"{i}\">P{i}</div>",
                i = p.partition_index,
                s = esc(&p.hash_range_start),
                e = esc(&p.hash_range_end),
                pr = esc(&p.primary_node_ip),
            );
        }
        self.html.push_str("</div>");
    }

    /// A table; `id` names it for tests and links.
    pub fn table(&mut self, id: &str, headers: &[&str], rows: &[Vec<Cell>]) {
        let _ = write!(
            self.html,
            "<div class=\"scroll\"><table id=\"{}\"><tr>",
            esc(id)
        );
        for h in headers {
            let _ = write!(self.html, "<th>{}</th>", esc(h));
        }
        self.html.push_str("</tr>");
        for r in rows {
            self.html.push_str("<tr>");
            for c in r {
                match c.class {
                    Some(class) => {
                        let _ = write!(self.html, "<td class=\"{class}\">{}</td>", esc(&c.text));
                    }
                    None => {
                        let _ = write!(self.html, "<td>{}</td>", esc(&c.text));
                    }
                }
            }
            self.html.push_str("</tr>");
        }
        self.html.push_str("</table></div>");
    }

    /// The recent changes of the map.
    pub fn changes(&mut self, changes: &[Change]) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let rows: Vec<Vec<Cell>> = changes
            .iter()
            .map(|c| {
                vec![
                    Cell::plain(c.epoch.to_string()),
                    Cell::plain(format!(
                        "{:.0} s ago",
                        now.saturating_sub(c.at_unix_ms) as f64 / 1000.0
                    )),
                    Cell::plain(c.what.clone()),
                ]
            })
            .collect();
        self.table("changes", &["epoch", "when", "what changed"], &rows);
    }

    /// The finished page.
    pub fn finish(mut self) -> String {
        self.html.push_str("</body></html>");
        self.html
    }
}

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:1em;color:#222;max-width:70em}\
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.1em;margin:1.2em 0 .4em}\
.facts>span{display:inline-block;margin:0 1.2em .2em 0;max-width:100%;overflow-wrap:anywhere}\
.ring{display:flex;height:2.2em;border-radius:4px;overflow:hidden;border:1px solid #999}\
.range{color:#fff;font-size:.8em;display:flex;align-items:center;justify-content:center;overflow:hidden;\
border-right:1px solid #fff}\
.scroll{overflow-x:auto}table{border-collapse:collapse;min-width:100%}\
th,td{text-align:left;padding:.25em .6em;border-bottom:1px solid #ddd;white-space:nowrap}\
th{background:#f3f3f3}.ok{color:#1a7f37}.warn{color:#9a6700}.bad{color:#cf222e;font-weight:bold}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::PartitionDoc;

    fn doc(epoch: u64, primaries: &[&str]) -> TopologyDoc {
        TopologyDoc {
            cluster_epoch: epoch,
            master_node_id: "c".into(),
            partition_count: primaries.len() as u32,
            partitions: primaries
                .iter()
                .enumerate()
                .map(|(i, p)| PartitionDoc {
                    partition_index: i as u32,
                    primary_node_ip: (*p).into(),
                    replica_node_ips: vec![],
                    hash_range_start: if i == 0 { "00000000" } else { "80000000" }.into(),
                    hash_range_end: if i == 0 { "7fffffff" } else { "ffffffff" }.into(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_change_says_which_primary_moved() {
        assert_eq!(
            describe(&doc(1, &["a", "b"]), &doc(2, &["a", "c"])),
            "partition 1: primary b → c"
        );
        assert_eq!(
            describe(&doc(1, &["a"]), &doc(2, &["a"])),
            "map updated (members)"
        );
        let changes = Changes::default();
        for e in 0..30 {
            changes.record(None, &doc(e, &["a"]));
        }
        let l = changes.list();
        assert_eq!((l.len(), l[0].epoch), (KEPT, 29), "newest first, bounded");
    }

    #[test]
    fn the_page_escapes_what_it_shows_and_draws_the_ring() {
        let mut p = Page::new("t<x>", 2);
        p.ring(&doc(3, &["10.0.0.1:1", "10.0.0.2:1"]));
        p.table("t", &["h"], &[vec![Cell::plain("<script>")]]);
        let html = p.finish();
        assert!(html.contains("t&lt;x&gt;") && html.contains("&lt;script&gt;"));
        assert!(!html.contains("<script>"));
        assert_eq!(html.matches("class=\"range\"").count(), 2);
        assert!(html.contains("width:50.000%"));
    }
}
