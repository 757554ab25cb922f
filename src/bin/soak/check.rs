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
use crate::faults::{Fault, Kind};
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
    /// Earliest moment it may have been numbered (a publish's send time).
    pub born_t: f64,
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
    /// Seconds from an event's first sighting to each other delivery of it.
    pub delays: Vec<f64>,
    pub worst_delay: Option<String>,
    /// Event ids that named two different events (Redis lost writes).
    pub id_reused: usize,
    /// Snapshot versions shown again after a resume elsewhere (not counted).
    pub reseen: usize,
    pub notes: Vec<String>,
}

/// Findings shared by several dashboards print once: (category, what) ->
/// the dashboards, each with its own side of it.
type Groups = BTreeMap<(u8, String), Vec<String>>;

const SHOW: usize = 20;

/// `end_t`: when the dashboards were stopped (end of the settle period).
pub fn judge(
    dashes: &[&DashState],
    ledger: &Ledger,
    faults: &[Fault],
    db: &Db,
    end_t: f64,
) -> Findings {
    let mut f = Findings::default();

    // Every event of each restaurant anybody saw.
    let mut known: HashMap<usize, BTreeMap<String, Known>> = HashMap::new();
    // One event id naming two different events (ids issued again after
    // Redis lost writes, hole 4): (restaurant, id) -> the two sightings.
    let mut reused: BTreeMap<(usize, String), (f64, String)> = BTreeMap::new();
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
                    born_t: r.t,
                });
                if (e.order, e.version) != (r.order, r.version) {
                    reused
                        .entry((d.restaurant, r.event_id.clone()))
                        .or_insert_with(|| {
                            (r.t, format!(
                                "{} order {} v={} (t={:.1}s, {}) and {} order {} v={} (t={:.1}s, {})",
                                e.kind,
                                e.order,
                                e.version.map(fmt_micros).unwrap_or_else(|| "-".into()),
                                e.first_t,
                                e.first_by,
                                r.kind,
                                r.order,
                                r.version.map(fmt_micros).unwrap_or_else(|| "-".into()),
                                r.t,
                                d.name
                            ))
                        });
                }
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
            first_by: format!(
                "order service ({} to a publish sent t={:.1}s)",
                if a.duplicate {
                    "200 duplicate answer"
                } else {
                    "202 answer"
                },
                a.sent_t
            ),
            born_t: a.sent_t,
        });
        e.born_t = e.born_t.min(a.sent_t);
        if a.t < e.first_t {
            e.first_t = a.t;
            e.first_by = format!("order service (publish sent t={:.1}s)", a.sent_t);
        }
    }

    let mut groups: Groups = BTreeMap::new();
    // Not a finding by itself (a dashboard reset in between is not harmed;
    // one that was not is caught as dup/disorder/lost), but worth knowing.
    f.id_reused = reused.len();
    for ((r, eid), (t, both)) in reused.into_iter().take(SHOW) {
        f.notes.push(format!(
            "NOTE      restaurant {r} event id {eid} named two events: {both}; {}",
            fault_text(&preceding(faults, t), t)
        ));
    }
    let mut worst = 0.0f64;
    for d in dashes {
        let empty = BTreeMap::new();
        let k = known.get(&d.restaurant).unwrap_or(&empty);

        // --- delivery delay (a deaf or stuck replica shows here first),
        // from each event's first sighting to this dashboard's first copy
        let mut got = std::collections::HashSet::new();
        for seg in &d.segments {
            for r in &seg.received {
                if !got.insert(r.event_id.as_str()) {
                    continue;
                }
                if let Some(e) = k.get(&r.event_id) {
                    let delay = r.t - e.first_t;
                    f.delays.push(delay);
                    if delay > worst {
                        worst = delay;
                        f.worst_delay = Some(format!(
                            "{:.1} s: {} (restaurant {}) got {} {} at t={:.1}s, first seen \
                             t={:.1}s by {}; on {}; {}",
                            delay,
                            d.name,
                            d.restaurant,
                            r.event_id,
                            r.kind,
                            r.t,
                            e.first_t,
                            e.first_by,
                            socket_n(d, r.conn),
                            fault_text(&preceding(faults, e.first_t), e.first_t)
                        ));
                    }
                }
            }
        }

        // --- silent gaps
        // Newest version of each order this dashboard had, over its whole
        // life up to and including the segment being judged.
        let mut had: HashMap<Uuid, i64> = HashMap::new();
        for seg in &d.segments {
            for (o, v) in &seg.versions {
                let e = had.entry(*o).or_insert(*v);
                *e = (*e).max(*v);
            }
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
            for (eid, e) in k.range::<String, _>((Bound::Excluded(&lower), Bound::Included(upper)))
            {
                if seg.ids.contains(eid) {
                    continue;
                }
                // The snapshot already showed this version (or a newer one):
                // skipping it is the seam doing its job.
                if e.version
                    .is_some_and(|v| seg.snapshot.get(&e.order).is_some_and(|s| *s >= v))
                {
                    continue;
                }
                // A version this dashboard already had (in this segment or
                // an earlier one), sent again under a new id after Redis lost
                // its dedup state: the replica suppresses the repeat, which
                // is the promise ("never the same version twice"), not a
                // loss. (This also hides the loss of an intermediate version
                // overtaken by a newer one: `diverged` still judges the
                // final state.)
                if e.version
                    .is_some_and(|v| had.get(&e.order).is_some_and(|s| *s >= v))
                {
                    continue;
                }
                // Redis forgot it (rollback/wipe) before this segment began:
                // its id may now name another event, and the reset that
                // began the segment is the right answer.
                if faults.iter().any(|f| {
                    matches!(f.kind, Kind::RedisRollback | Kind::RedisWipe)
                        && e.born_t.min(e.first_t) < f.end_t
                        && f.t <= seg.started_t
                }) {
                    continue;
                }
                f.lost += 1;
                // It went missing in this segment: blame the fault before
                // the later of its first sighting and the segment's start.
                let at = e.first_t.max(seg.started_t);
                let fault = preceding(faults, at);
                tally(&mut f.by_fault, &fault, "lost");
                let key = format!(
                    "LOST      restaurant {} event {eid} {} order {} {} v={}, first seen t={:.1}s \
                     by {}; {}",
                    d.restaurant,
                    e.kind,
                    e.order,
                    e.status.as_deref().unwrap_or("-"),
                    e.version.map(fmt_micros).unwrap_or_else(|| "-".into()),
                    e.first_t,
                    e.first_by,
                    fault_short(&fault)
                );
                groups.entry((0, key)).or_default().push(format!(
                    "{}: segment since t={:.1}s ({}) claims ({lower}, {upper}]; it was on {}",
                    d.name,
                    seg.started_t,
                    seg.how,
                    socket_at(d, at)
                ));
            }
        }

        // --- silence: events of the restaurant after the last one the
        // final segment got, sighted while that segment was in progress, that
        // never arrived by the end of the settle period (a deaf link)
        if let Some(seg) = d.current.map(|i| &d.segments[i]) {
            let from = seg.max_id.clone().unwrap_or_default();
            let missed: Vec<(&String, &Known)> = k
                .range::<String, _>((Bound::Excluded(&from), Bound::Unbounded))
                .filter(|(eid, e)| {
                    !(seg.ids.contains(*eid)
                        || e.first_t < seg.started_t
                        || e.first_t > end_t - 5.0
                        || e.version
                            .is_some_and(|v| seg.snapshot.get(&e.order).is_some_and(|s| *s >= v)))
                })
                .collect();
            if let (Some((first_id, first)), Some((last_id, _))) = (missed.first(), missed.last()) {
                f.lost += missed.len();
                // It went silent after its last receipt: blame the fault
                // before that moment.
                let silent_since = seg.received.last().map(|r| r.t).unwrap_or(seg.started_t);
                let fault = preceding(faults, first.first_t);
                // The replica it was on may have been broken long before.
                let instance = d
                    .conns
                    .iter()
                    .rev()
                    .find(|c| c.t <= first.first_t)
                    .map(|c| c.instance.clone())
                    .unwrap_or_default();
                let on_replica = faults
                    .iter()
                    .rev()
                    .find(|f| {
                        !instance.is_empty()
                            && (f.detail.contains(&format!("{instance}:"))
                                || f.detail.contains(&format!("{instance} ")))
                    })
                    .map(|f| {
                        format!(
                            "; last fault on {instance}: #{} {} at t={:.1}s ({})",
                            f.n,
                            f.kind.name(),
                            f.t,
                            f.detail
                        )
                    })
                    .unwrap_or_default();
                *f.by_fault
                    .entry(
                        fault
                            .as_ref()
                            .map(|f| f.kind.name().to_string())
                            .unwrap_or_else(|| "(no fault yet)".into()),
                    )
                    .or_default()
                    .entry("lost")
                    .or_default() += missed.len();
                let key = format!(
                    "LOST      {} (restaurant {}): {} event(s) never arrived on a live socket — \
                     {first_id} … {last_id}, the first {} order {} {} v={} sighted t={:.1}s by \
                     {}; last event it received at t={silent_since:.1}s ({}); it was on {}; {}",
                    d.name,
                    d.restaurant,
                    missed.len(),
                    first.kind,
                    first.order,
                    first.status.as_deref().unwrap_or("-"),
                    first.version.map(fmt_micros).unwrap_or_else(|| "-".into()),
                    first.first_t,
                    first.first_by,
                    seg.max_id.as_deref().unwrap_or("none"),
                    socket_at(d, first.first_t),
                    fault_text(&fault, first.first_t)
                ) + &on_replica;
                groups.entry((0, key)).or_default().push(d.name.clone());
            }
        }

        // --- dup / disorder
        for v in &d.violations {
            let fault = preceding(faults, v.t);
            let (cat, label, name) = match v.kind {
                Breach::Dup => {
                    f.dup += 1;
                    (1, "DUP      ", "dup")
                }
                Breach::Disorder => {
                    f.disorder += 1;
                    (2, "DISORDER ", "disorder")
                }
                Breach::Reseen => {
                    f.reseen += 1;
                    (4, "RESEEN   ", "reseen (not counted)")
                }
            };
            tally(&mut f.by_fault, &fault, name);
            let key = format!(
                "{label} restaurant {} {}; {}",
                d.restaurant,
                v.what,
                fault_short(&fault)
            );
            groups.entry((cat, key)).or_default().push(format!(
                "{} at t={:.1}s, {}, on {}",
                d.name,
                v.t,
                v.context,
                socket_n(d, v.conn)
            ));
        }

        // --- convergence
        let want = db.get(&d.restaurant).cloned().unwrap_or_default();
        let diffs = diff_view(&d.view, &want);
        if !diffs.is_empty() || d.offline.is_some() {
            f.diverged += 1;
            let mut key = format!(
                "DIVERGED  restaurant {}: {} difference(s){}",
                d.restaurant,
                diffs.len(),
                d.offline
                    .as_ref()
                    .map(|o| format!("; OFFLINE: {o}"))
                    .unwrap_or_default()
            );
            for (id, what) in diffs.iter().take(6) {
                key.push_str(&format!("\n            order {id}: {what}"));
                if let Some(w) = ledger.writes.get(id).and_then(|w| w.last()) {
                    key.push_str(&format!(
                        "\n              last write t={:.1}s {}{}; {}",
                        w.t,
                        w.what,
                        if w.version > 0 {
                            format!(" v={}", fmt_micros(w.version))
                        } else {
                            String::new()
                        },
                        fault_text(&preceding(faults, w.t), w.t)
                    ));
                }
            }
            if diffs.len() > 6 {
                key.push_str(&format!("\n            … {} more", diffs.len() - 6));
            }
            let last = d.conns.last();
            groups.entry((3, key)).or_default().push(format!(
                "{} now on {}",
                d.name,
                last.map(conn_text).unwrap_or_else(|| "no socket".into())
            ));
        }
    }

    let mut shown = [0usize; 5];
    let mut hidden = [0usize; 5];
    for ((cat, key), who) in groups {
        let c = cat as usize;
        if shown[c] >= SHOW {
            hidden[c] += 1;
            continue;
        }
        shown[c] += 1;
        f.lines.push(key);
        let names: Vec<&str> = who
            .iter()
            .map(|w| w.split([':', ' ']).next().unwrap_or_default())
            .collect();
        f.lines.push(format!(
            "            seen by {} dashboard(s): {}",
            who.len(),
            names.join(" ")
        ));
        for w in who.iter().take(2) {
            f.lines.push(format!("            {w}"));
        }
    }
    for (c, what) in ["lost", "dup", "disorder", "diverged", "reseen"]
        .iter()
        .enumerate()
    {
        if hidden[c] > 0 {
            f.lines.push(format!(
                "          … and {} more {what} finding(s)",
                hidden[c]
            ));
        }
    }
    f
}

/// Differences between a board and the database's open orders.
/// The database's content under a later version than its `updated_at`: the
/// poller republishes a row whose `updated_at` went backwards — a trigger
/// stamping `now()`, or a database that lost its latest commits (the soak's
/// own PostgreSQL runs with `fsync=off`, so `pg-restart -m immediate` can roll
/// rows back) — 1 µs after the newest version it published
/// (`orders_gateway_poller_restamped_total`), so that boards, which never go
/// back to an older version, take the change. Same status and items, later
/// version: converged.
fn restamped(shown: &Shown, db: &Shown) -> bool {
    shown.version > db.version && shown.status == db.status && shown.items == db.items
}

pub fn diff_view(view: &HashMap<Uuid, Shown>, want: &HashMap<Uuid, Shown>) -> Vec<(Uuid, String)> {
    let mut out = Vec::new();
    for (id, w) in want {
        match view.get(id) {
            None => out.push((
                *id,
                format!(
                    "missing (database: {} v={})",
                    w.status,
                    fmt_micros(w.version)
                ),
            )),
            Some(s) if s != w && !restamped(s, w) => out.push((
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
            "after fault #{} {} at t={:.1}s–{:.1}s ({:.1} s before; {})",
            f.n,
            f.kind.name(),
            f.t,
            f.end_t,
            t - f.t,
            f.detail
        ),
        None => "before any fault".into(),
    }
}

fn fault_short(f: &Option<Fault>) -> String {
    match f {
        Some(f) => format!(
            "after fault #{} {} at t={:.1}s–{:.1}s ({})",
            f.n,
            f.kind.name(),
            f.t,
            f.end_t,
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
