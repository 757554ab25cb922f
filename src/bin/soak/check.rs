//! The end-of-run judgement, per dashboard:
//! - **lost**: an event of its restaurant (received by another dashboard or
//!   acknowledged to the order service) whose id lies inside a stretch where
//!   this dashboard claims continuity, yet it never arrived (a silent gap);
//! - **dup**: the same order version or event id twice between two resets;
//! - **disorder**: an older version after a newer one, or event ids going
//!   backwards, between two resets;
//! - **diverged**: after the settle period its board differs from the
//!   database's open orders.
//!
//! Every finding names the restaurant, the order version, the event id, the
//! socket the dashboard was on and the fault that preceded it.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use uuid::Uuid;

use crate::dashboard::{Breach, DashState, Shown, fmt_micros};
use crate::faults::Fault;
use crate::writer::Ledger;

/// An event some dashboard received or the order service was answered.
#[derive(Clone, Debug)]
pub struct Known {
    pub kind: String,
    pub order: Uuid,
    pub version: Option<i64>,
    pub status: Option<String>,
    pub first_t: f64,
    pub first_by: String,
}

pub type Db = HashMap<usize, HashMap<Uuid, Shown>>;

#[derive(Default)]
pub struct Findings {
    pub lost: usize,
    pub dup: usize,
    pub disorder: usize,
    pub diverged: usize,
    pub lines: Vec<String>,
    /// Findings per kind of the fault that preceded them.
    pub by_fault: BTreeMap<String, BTreeMap<&'static str, usize>>,
}

const SHOW: usize = 25;

pub fn judge(dashes: &[&DashState], ledger: &Ledger, faults: &[Fault], db: &Db) -> Findings {
    let mut f = Findings::default();

    // Every event of each restaurant anybody saw.
    let mut known: HashMap<usize, BTreeMap<String, Known>> = HashMap::new();
    for d in dashes {
        for seg in &d.segments {
            for r in &seg.received {
                if r.event_id.is_empty() {
                    continue;
                }
                let k = known.entry(d.restaurant).or_default();
                let e = k.entry(r.event_id.clone()).or_insert_with(|| Known {
                    kind: r.kind.clone(),
                    order: r.order,
                    version: r.version,
                    status: r.status.clone(),
                    first_t: r.t,
                    first_by: d.name.clone(),
                });
                if r.t < e.first_t {
                    e.first_t = r.t;
                    e.first_by = d.name.clone();
                }
            }
        }
    }
    for a in &ledger.acks {
        let k = known.entry(a.restaurant).or_default();
        let e = k.entry(a.event_id.clone()).or_insert_with(|| Known {
            kind: a.kind.clone(),
            order: a.order,
            version: Some(a.version),
            status: None,
            first_t: a.t,
            first_by: "order service (publish answer)".into(),
        });
        if a.t < e.first_t {
            e.first_t = a.t;
        }
    }

    let mut lost_lines = Vec::new();
    let mut breach_lines = Vec::new();
    let mut diverged_lines = Vec::new();

    for d in dashes {
        // --- silent gaps
        let empty = BTreeMap::new();
        let k = known.get(&d.restaurant).unwrap_or(&empty);
        let mut lost_here = 0;
        for seg in &d.segments {
            let Some(upper) = &seg.max_id else { continue };
            let lower = match &seg.start {
                Some(s) => s.clone(),
                // A snapshot without a cursor vouches for the whole history
                // that its first event belongs to.
                None => match seg.received.iter().find(|r| !r.event_id.is_empty()) {
                    Some(r) => format!("{}-", r.event_id.split('-').next().unwrap_or_default()),
                    None => continue,
                },
            };
            if &lower >= upper {
                continue;
            }
            for (eid, e) in k.range::<String, _>((Bound::Excluded(&lower), Bound::Included(upper))) {
                if seg.ids.contains(eid) {
                    continue;
                }
                f.lost += 1;
                lost_here += 1;
                let fault = preceding(faults, e.first_t);
                tally(&mut f.by_fault, &fault, "lost");
                lost_lines.push(format!(
                    "LOST      {} (restaurant {}) missed {eid} {} order {} {} v={} — first seen \
                     t={:.1}s by {}; its segment since t={:.1}s ({}, from {}) claims ({}, {}]; \
                     it was on {}; {}",
                    d.name,
                    d.restaurant,
                    e.kind,
                    e.order,
                    e.status.as_deref().unwrap_or("-"),
                    e.version.map(fmt_micros).unwrap_or_else(|| "-".into()),
                    e.first_t,
                    e.first_by,
                    seg.started_t,
                    seg.how,
                    seg.start.as_deref().unwrap_or("no cursor"),
                    lower,
                    upper,
                    socket_at(d, e.first_t),
                    fault_text(&fault, e.first_t)
                ));
            }
        }
        let _ = lost_here;

        // --- dup / disorder
        for v in &d.violations {
            let fault = preceding(faults, v.t);
            let (label, name) = match v.kind {
                Breach::Dup => {
                    f.dup += 1;
                    ("DUP      ", "dup")
                }
                Breach::Disorder => {
                    f.disorder += 1;
                    ("DISORDER ", "disorder")
                }
            };
            tally(&mut f.by_fault, &fault, name);
            breach_lines.push(format!(
                "{label} {} (restaurant {}) t={:.1}s {} — on {}; {}",
                d.name,
                d.restaurant,
                v.t,
                v.what,
                socket_n(d, v.conn),
                fault_text(&fault, v.t)
            ));
        }

        // --- convergence
        let want = db.get(&d.restaurant).cloned().unwrap_or_default();
        let diffs = diff_view(&d.view, &want);
        if !diffs.is_empty() || d.offline.is_some() {
            f.diverged += 1;
            let last = d.conns.last();
            let mut line = format!(
                "DIVERGED  {} (restaurant {}) {} difference(s); now on {}{}",
                d.name,
                d.restaurant,
                diffs.len(),
                last.map(|c| conn_text(c)).unwrap_or_else(|| "no socket".into()),
                d.offline
                    .as_ref()
                    .map(|o| format!("; OFFLINE: {o}"))
                    .unwrap_or_default()
            );
            for (id, what) in diffs.iter().take(4) {
                line.push_str(&format!("\n            order {id}: {what}"));
                if let Some(w) = ledger.writes.get(id).and_then(|w| w.last()) {
                    line.push_str(&format!(
                        " (last write t={:.1}s {} v={}; {})",
                        w.t,
                        w.what,
                        fmt_micros(w.version),
                        fault_text(&preceding(faults, w.t), w.t)
                    ));
                }
                if let Some(r) = d
                    .segments
                    .iter()
                    .flat_map(|s| s.received.iter())
                    .filter(|r| r.order == *id)
                    .last()
                {
                    line.push_str(&format!(
                        "; last event it got: t={:.1}s {} {} {}",
                        r.t,
                        r.event_id,
                        r.kind,
                        r.status.as_deref().unwrap_or("-")
                    ));
                }
            }
            diverged_lines.push(line);
        }
    }

    for (lines, what) in [
        (lost_lines, "lost"),
        (breach_lines, "dup/disorder"),
        (diverged_lines, "diverged"),
    ] {
        let n = lines.len();
        f.lines.extend(lines.into_iter().take(SHOW));
        if n > SHOW {
            f.lines.push(format!("          … and {} more {what}", n - SHOW));
        }
    }
    f
}

/// Differences between a board and the database's open orders.
pub fn diff_view(view: &HashMap<Uuid, Shown>, want: &HashMap<Uuid, Shown>) -> Vec<(Uuid, String)> {
    let mut out = Vec::new();
    for (id, w) in want {
        match view.get(id) {
            None => out.push((
                *id,
                format!("missing (database: {} v={})", w.status, fmt_micros(w.version)),
            )),
            Some(s) if s != w => out.push((
                *id,
                format!(
                    "shows {} v={} items={:?}, database {} v={} items={:?}",
                    s.status,
                    fmt_micros(s.version),
                    s.items.iter().map(|i| i.1).collect::<Vec<_>>(),
                    w.status,
                    fmt_micros(w.version),
                    w.items.iter().map(|i| i.1).collect::<Vec<_>>()
                ),
            )),
            Some(_) => {}
        }
    }
    for (id, s) in view {
        if !want.contains_key(id) {
            out.push((
                *id,
                format!(
                    "shown ({} v={}) but not open in the database",
                    s.status,
                    fmt_micros(s.version)
                ),
            ));
        }
    }
    out.sort_by_key(|(id, _)| *id);
    out
}

fn preceding(faults: &[Fault], t: f64) -> Option<Fault> {
    faults.iter().rev().find(|f| f.t <= t).cloned()
}

fn fault_text(f: &Option<Fault>, t: f64) -> String {
    match f {
        Some(f) => format!(
            "after fault #{} {} at t={:.1}s ({:.1} s before; {})",
            f.n,
            f.kind.name(),
            f.t,
            t - f.t,
            f.detail
        ),
        None => "before any fault".into(),
    }
}

fn tally(
    by: &mut BTreeMap<String, BTreeMap<&'static str, usize>>,
    f: &Option<Fault>,
    what: &'static str,
) {
    let key = f
        .as_ref()
        .map(|f| f.kind.name().to_string())
        .unwrap_or_else(|| "(no fault yet)".into());
    *by.entry(key).or_default().entry(what).or_default() += 1;
}

fn conn_text(c: &crate::dashboard::Conn) -> String {
    format!(
        "socket #{} r{} {} (t={:.1}–{}, cursor {}, resumed {}, end: {})",
        c.n,
        c.slot,
        if c.instance.is_empty() {
            "-"
        } else {
            &c.instance
        },
        c.t,
        c.end_t
            .map(|t| format!("{t:.1}s"))
            .unwrap_or_else(|| "open".into()),
        c.sent_cursor.as_deref().unwrap_or("none"),
        c.resumed
            .map(|r| r.to_string())
            .unwrap_or_else(|| "-".into()),
        if c.end.is_empty() { "-" } else { &c.end }
    )
}

fn socket_at(d: &DashState, t: f64) -> String {
    d.conns
        .iter()
        .rev()
        .find(|c| c.t <= t)
        .map(|c| {
            if c.end_t.is_some_and(|e| e < t) {
                format!("no socket (last: {})", conn_text(c))
            } else {
                conn_text(c)
            }
        })
        .unwrap_or_else(|| "no socket yet".into())
}

fn socket_n(d: &DashState, n: u32) -> String {
    d.conns
        .iter()
        .find(|c| c.n == n)
        .map(conn_text)
        .unwrap_or_else(|| format!("socket #{n}"))
}
