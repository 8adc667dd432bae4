//! Who a campaign is for, and in which wave: a pure function of the plan,
//! the fleet's retained states and a seed. Membership is frozen when the
//! campaign starts; devices that appear later are late joiners.

use std::collections::{BTreeMap, BTreeSet};

use super::plan::{Order, Plan, Selection, WaveSize};
use crate::transport::protocol::DeviceStatus;

/// What the broker says about one device. Missing state is unknown, never
/// failed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceFacts {
    pub online: Option<bool>,
    pub state: Option<DeviceStatus>,
}

impl DeviceFacts {
    pub fn running(&self) -> Option<&str> {
        self.state.as_ref().and_then(|s| s.running.as_deref())
    }
    pub fn permanent(&self) -> Option<&str> {
        self.state.as_ref().and_then(|s| s.permanent.as_deref())
    }
}

/// Does the selection take this device, by what it reported?
pub fn selects(sel: &Selection, id: &str, facts: &DeviceFacts) -> bool {
    let groups = facts.state.as_ref().map_or(&[][..], |s| &s.groups[..]);
    let member = sel.whole_fleet()
        || sel.devices.iter().any(|d| d == id)
        || sel.groups.iter().any(|g| groups.contains(g));
    let running = match &sel.running {
        None => true,
        Some(v) => facts.running() == Some(v.as_str()),
    };
    member && running
}

/// A small, seedable shuffle (splitmix64), so that an order can be
/// repeated from the seed a campaign records.
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..v.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// The waves, each an ordered list of device ids, and the selected
/// devices no wave takes (a plan may roll out to part of a selection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roster {
    pub waves: Vec<Vec<String>>,
    pub left_out: Vec<String>,
}

pub fn roster(plan: &Plan, fleet: &BTreeMap<String, DeviceFacts>, seed: u64) -> Roster {
    let unknown = DeviceFacts::default();
    // Devices named in the selection or a wave belong even without a
    // retained state (they may never have connected to this broker yet).
    let mut named: BTreeSet<&str> = plan.select.devices.iter().map(String::as_str).collect();
    for w in &plan.waves {
        if let WaveSize::Devices(d) = &w.size {
            named.extend(d.iter().map(String::as_str));
        }
    }
    let mut selected: Vec<String> = fleet
        .keys()
        .map(String::as_str)
        .chain(named.iter().copied())
        .collect::<BTreeSet<&str>>()
        .into_iter()
        .filter(|id| {
            let f = fleet.get(*id).unwrap_or(&unknown);
            selects(&plan.select, id, f)
                || plan
                    .waves
                    .iter()
                    .any(|w| matches!(&w.size, WaveSize::Devices(d) if d.iter().any(|x| x == id)))
        })
        .map(str::to_string)
        .collect();
    if plan.order == Order::Random {
        shuffle(&mut selected, seed);
    }
    let total = selected.len();
    let mut taken: BTreeSet<String> = BTreeSet::new();
    // Explicit devices first, whatever their wave, so that a later
    // count cannot take a canary.
    for w in &plan.waves {
        if let WaveSize::Devices(d) = &w.size {
            taken.extend(d.iter().cloned());
        }
    }
    let mut pool = selected.iter().filter(|d| !taken.contains(*d));
    let mut waves = Vec::new();
    let mut used: BTreeSet<String> = BTreeSet::new();
    for w in &plan.waves {
        let devices: Vec<String> = match &w.size {
            WaveSize::Devices(d) => d
                .iter()
                .filter(|x| used.insert((*x).clone()))
                .cloned()
                .collect(),
            WaveSize::Count(n) => pool.by_ref().take(*n).cloned().collect(),
            WaveSize::Percent(p) => {
                let n = ((total as f64) * p / 100.0).ceil() as usize;
                pool.by_ref().take(n.max(1)).cloned().collect()
            }
            WaveSize::Rest => pool.by_ref().cloned().collect(),
        };
        used.extend(devices.iter().cloned());
        waves.push(devices);
    }
    let left_out = pool.cloned().collect();
    Roster { waves, left_out }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::campaign::plan;

    fn fleet(n: usize) -> BTreeMap<String, DeviceFacts> {
        (0..n)
            .map(|i| {
                let id = format!("d{i:03}");
                let state = DeviceStatus {
                    v: 1,
                    device: id.clone(),
                    fleet: "f".into(),
                    groups: if i % 2 == 0 {
                        vec!["even".into()]
                    } else {
                        vec![]
                    },
                    agent_version: "0".into(),
                    running: Some(if i < 3 { "2.0.0" } else { "1.0.0" }.into()),
                    permanent: None,
                    phase: crate::transport::protocol::PhaseReport::idle(),
                    last_outcome: None,
                    discarded: None,
                    dry_run: None,
                    updated_at: String::new(),
                };
                (
                    id,
                    DeviceFacts {
                        online: Some(true),
                        state: Some(state),
                    },
                )
            })
            .collect()
    }

    fn plan(extra: &str, waves: &str) -> Plan {
        plan::parse(
            &format!("bundle = \"b\"\nfleet = \"f\"\n{extra}\n{waves}"),
            std::path::Path::new("/"),
        )
        .unwrap()
    }

    #[test]
    fn canaries_first_then_percentages_then_the_rest() {
        let p = plan(
            "",
            "[[waves]]\ndevices = [\"d007\"]\n[[waves]]\npercent = 10\n[[waves]]\nrest = true\n",
        );
        let r = roster(&p, &fleet(50), 7);
        assert_eq!(r.waves[0], ["d007"]);
        assert_eq!(r.waves[1].len(), 5);
        assert_eq!(r.waves[2].len(), 44);
        assert!(r.left_out.is_empty());
        let all: BTreeSet<&String> = r.waves.iter().flatten().collect();
        assert_eq!(all.len(), 50, "each device in exactly one wave");
        assert!(!r.waves[1].contains(&"d007".to_string()));
        // The same seed gives the same order; another seed another.
        assert_eq!(roster(&p, &fleet(50), 7), r);
        assert_ne!(roster(&p, &fleet(50), 8).waves[2], r.waves[2]);
    }

    #[test]
    fn selection_by_group_and_running_release() {
        let p = plan(
            "[select]\ngroups = [\"even\"]\nrunning = \"1.0.0\"\n[rollout]\norder = \"id\"",
            "[[waves]]\nrest = true\n",
        );
        let r = roster(&p, &fleet(10), 1);
        // Even ids, less d000 and d002 which run 2.0.0.
        assert_eq!(r.waves[0], ["d004", "d006", "d008"]);
    }

    #[test]
    fn a_partial_rollout_lists_who_is_left_out() {
        let p = plan("[rollout]\norder = \"id\"", "[[waves]]\ncount = 2\n");
        let r = roster(&p, &fleet(5), 1);
        assert_eq!(r.waves[0], ["d000", "d001"]);
        assert_eq!(r.left_out, ["d002", "d003", "d004"]);
    }

    #[test]
    fn named_devices_without_state_are_members() {
        let p = plan(
            "",
            "[[waves]]\ndevices = [\"ghost\"]\n[[waves]]\nrest = true\n",
        );
        let r = roster(&p, &fleet(2), 1);
        assert_eq!(r.waves[0], ["ghost"]);
        assert_eq!(r.waves[1].len(), 2);
    }
}
