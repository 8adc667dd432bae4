//! The MQTT protocol between devices (`beamup agent`), servers (`beamup
//! serve`) and operators (`beamup offer`, `beamup fleet`): topic names and
//! payloads, and nothing else. No I/O here; `docs/PROTOCOL.md` is the prose
//! version of this file and the two change together.
//!
//! ```text
//! PREFIX/FLEET/device/ID/offer    operator -> device   signed manifest envelope   QoS 1, retained
//! PREFIX/FLEET/group/G/offer      operator -> group    signed manifest envelope   QoS 1, retained
//! PREFIX/FLEET/device/ID/cmd      operator -> device   Command (JSON)             QoS 1
//! PREFIX/FLEET/req/ID             device -> servers    ChunkRequest (JSON)        QoS 0
//! PREFIX/FLEET/device/ID/data     server -> device     data reply (binary)        QoS 0
//! PREFIX/FLEET/device/ID/state    device -> all        DeviceStatus (JSON)        QoS 1, retained
//! PREFIX/FLEET/device/ID/online   device -> all        Online (JSON), also LWT    QoS 1, retained
//! PREFIX/FLEET/device/ID/events   device -> all        Event (JSON)               QoS 1, via the outbox
//! PREFIX/FLEET/campaign/C/status  controller -> all    campaign view (JSON)       QoS 1, retained
//! PREFIX/FLEET/campaign/C/control operator -> controller  CampaignControl (JSON)  QoS 1, retained
//! PREFIX/FLEET/campaign/C/controller  controller (and its last will) -> all  ControllerLease  QoS 1, retained
//! PREFIX/FLEET/sync/CLIENT       a reader -> itself   marker nonce: its retained messages are in   QoS 1
//! ```
//!
//! JSON payloads carry `"v": 1`; binary data replies start with a 4-byte
//! magic that names the version. A receiver ignores (and logs) a payload
//! whose version it does not know.

use serde::{Deserialize, Serialize};

/// The version of every JSON payload.
pub(crate) const VERSION: u32 = 1;

/// Magic of a data reply carrying tarball bytes.
pub(crate) const DATA_MAGIC: &[u8; 4] = b"BUD1";
/// Magic of a data reply saying the server cannot serve a request.
pub(crate) const ERROR_MAGIC: &[u8; 4] = b"BUE1";
/// magic + tarball SHA-256 + offset.
pub(crate) const DATA_HEADER: usize = 4 + 32 + 8;

#[cfg(feature = "operator")]
/// Shared-subscription group of `beamup serve`: the broker hands each
/// request to one of the servers subscribed in this group.
pub(crate) const SERVE_SHARE_GROUP: &str = "beamup-serve";

/// A device id, fleet or group as a topic level: a safe name without `+`
/// (an MQTT wildcard).
pub(crate) fn is_topic_name(s: &str) -> bool {
    crate::release::manifest::is_safe_name(s) && !s.contains('+')
}

/// Topic names under `PREFIX/FLEET`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Topics {
    base: String,
}

/// What a topic is, as parsed by [`Topics::parse`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Topic {
    DeviceOffer(String),
    GroupOffer(String),
    Command(String),
    Request(String),
    Data(String),
    State(String),
    Online(String),
    Events(String),
    CampaignStatus(String),
    CampaignControl(String),
    CampaignController(String),
}

impl Topics {
    /// `prefix` may contain `/` (e.g. `acme/beamup`); it and `fleet` were
    /// checked as configuration.
    pub(crate) fn new(prefix: &str, fleet: &str) -> Topics {
        Topics {
            base: format!("{}/{fleet}", prefix.trim_end_matches('/')),
        }
    }

    fn device(&self, id: &str, leaf: &str) -> String {
        format!("{}/device/{id}/{leaf}", self.base)
    }

    pub(crate) fn device_offer(&self, id: &str) -> String {
        self.device(id, "offer")
    }
    pub(crate) fn group_offer(&self, group: &str) -> String {
        format!("{}/group/{group}/offer", self.base)
    }
    pub(crate) fn command(&self, id: &str) -> String {
        self.device(id, "cmd")
    }
    pub(crate) fn data(&self, id: &str) -> String {
        self.device(id, "data")
    }
    pub(crate) fn state(&self, id: &str) -> String {
        self.device(id, "state")
    }
    pub(crate) fn online(&self, id: &str) -> String {
        self.device(id, "online")
    }
    pub(crate) fn events(&self, id: &str) -> String {
        self.device(id, "events")
    }
    /// A reader's own marker topic, for knowing when its subscriptions'
    /// retained messages are all in (`mqtt::Settle`).
    #[cfg(feature = "operator")]
    pub(crate) fn sync(&self, client_id: &str) -> String {
        format!("{}/sync/{client_id}", self.base)
    }
    pub(crate) fn request(&self, id: &str) -> String {
        format!("{}/req/{id}", self.base)
    }

    #[cfg(feature = "operator")]
    fn campaign(&self, id: &str, leaf: &str) -> String {
        format!("{}/campaign/{id}/{leaf}", self.base)
    }
    #[cfg(feature = "operator")]
    pub fn campaign_status(&self, id: &str) -> String {
        self.campaign(id, "status")
    }
    #[cfg(feature = "operator")]
    pub fn campaign_control(&self, id: &str) -> String {
        self.campaign(id, "control")
    }
    #[cfg(feature = "operator")]
    pub fn campaign_controller(&self, id: &str) -> String {
        self.campaign(id, "controller")
    }
    /// Every campaign's retained view (`beamup campaign list`).
    #[cfg(feature = "operator")]
    pub fn campaign_status_filter(&self) -> String {
        self.campaign("+", "status")
    }
    #[cfg(feature = "operator")]
    pub fn device_offer_filter(&self) -> String {
        self.device("+", "offer")
    }

    #[cfg(feature = "operator")]
    /// What `beamup serve` subscribes to: every device's requests, shared
    /// among the servers of the fleet (MQTT 5 shared subscription; mosquitto
    /// also honours it for 3.1.1 clients).
    pub(crate) fn request_filter(&self, shared: bool) -> String {
        let f = format!("{}/req/+", self.base);
        if shared {
            format!("$share/{SERVE_SHARE_GROUP}/{f}")
        } else {
            f
        }
    }
    #[cfg(feature = "operator")]
    pub(crate) fn state_filter(&self) -> String {
        self.device("+", "state")
    }
    #[cfg(feature = "operator")]
    pub(crate) fn online_filter(&self) -> String {
        self.device("+", "online")
    }
    #[cfg(feature = "operator")]
    pub(crate) fn events_filter(&self) -> String {
        self.device("+", "events")
    }

    /// The subscriptions of a device: only what concerns it.
    pub(crate) fn device_subscriptions(&self, id: &str, groups: &[String]) -> Vec<String> {
        let mut v = vec![self.device_offer(id), self.command(id), self.data(id)];
        v.extend(groups.iter().map(|g| self.group_offer(g)));
        v
    }

    pub(crate) fn parse(&self, topic: &str) -> Option<Topic> {
        let rest = topic.strip_prefix(&self.base)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        let name = |s: &str| is_topic_name(s).then(|| s.to_string());
        match parts.as_slice() {
            ["device", id, leaf] => {
                let id = name(id)?;
                Some(match *leaf {
                    "offer" => Topic::DeviceOffer(id),
                    "cmd" => Topic::Command(id),
                    "data" => Topic::Data(id),
                    "state" => Topic::State(id),
                    "online" => Topic::Online(id),
                    "events" => Topic::Events(id),
                    _ => return None,
                })
            }
            ["group", g, "offer"] => Some(Topic::GroupOffer(name(g)?)),
            ["campaign", c, leaf] => {
                let c = name(c)?;
                Some(match *leaf {
                    "status" => Topic::CampaignStatus(c),
                    "control" => Topic::CampaignControl(c),
                    "controller" => Topic::CampaignController(c),
                    _ => return None,
                })
            }
            ["req", id] => Some(Topic::Request(name(id)?)),
            _ => None,
        }
    }
}

/// A device asks for `len` bytes of the tarball whose SHA-256 is `bundle`,
/// from `offset`, answered in replies of `piece` bytes each (the last may
/// be shorter). No reply spans two chunks: `offset` and `piece` are chosen
/// by the device so that every piece lies within one chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChunkRequest {
    pub(crate) v: u32,
    /// SHA-256 (hex) of the release tarball, from the signed manifest.
    pub(crate) bundle: String,
    /// The first chunk concerned (for logs).
    pub(crate) chunk: u32,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    /// Bytes per reply; absent: one reply of `len` bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) piece: Option<u32>,
    /// How long the device waits for the replies before it asks again, in
    /// milliseconds. A server that could not start on the request within
    /// that (its queue was that long) drops it: the device has asked again
    /// by then, and the replies would be sent twice. Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) wait_ms: Option<u64>,
}

impl ChunkRequest {
    #[cfg(feature = "operator")]
    /// The replies it asks for: (offset, len) of each.
    pub(crate) fn replies(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let piece = self.piece.unwrap_or(self.len).max(1);
        let n = self.len.div_ceil(piece);
        (0..n).map(move |k| {
            let off = u64::from(k) * u64::from(piece);
            (self.offset + off, piece.min(self.len - k * piece))
        })
    }
}

/// A data reply, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DataReply<'a> {
    Data {
        bundle: [u8; 32],
        offset: u64,
        data: &'a [u8],
    },
    Error {
        bundle: [u8; 32],
        offset: u64,
        message: String,
    },
}

pub fn encode_data(bundle: &[u8; 32], offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(DATA_HEADER + data.len());
    v.extend_from_slice(DATA_MAGIC);
    v.extend_from_slice(bundle);
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(data);
    v
}

#[cfg(feature = "operator")]
pub(crate) fn encode_error(bundle: &[u8; 32], offset: u64, message: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(DATA_HEADER + message.len());
    v.extend_from_slice(ERROR_MAGIC);
    v.extend_from_slice(bundle);
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(message.as_bytes());
    v
}

pub(crate) fn decode_data(payload: &[u8]) -> Result<DataReply<'_>, String> {
    if payload.len() < DATA_HEADER {
        return Err(format!(
            "data reply of {} bytes is too short",
            payload.len()
        ));
    }
    let bundle: [u8; 32] = payload[4..36].try_into().expect("32 bytes");
    let offset = u64::from_be_bytes(payload[36..44].try_into().expect("8 bytes"));
    let rest = &payload[DATA_HEADER..];
    match &payload[..4] {
        m if m == DATA_MAGIC => Ok(DataReply::Data {
            bundle,
            offset,
            data: rest,
        }),
        m if m == ERROR_MAGIC => Ok(DataReply::Error {
            bundle,
            offset,
            message: String::from_utf8_lossy(rest).into_owned(),
        }),
        m => Err(format!("unknown data reply magic {m:?}")),
    }
}

/// Where a device is in handling an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum PhaseName {
    Idle,
    Downloading,
    Verifying,
    Unpacking,
    Installing,
    Soaking,
    Committed,
    RollingBack,
    RolledBack,
    Rejected,
    /// Finishing or undoing an install interrupted by a restart.
    Recovering,
    /// A rollback failed: a person must look.
    NeedsAttention,
}

impl PhaseName {
    #[cfg(feature = "operator")]
    pub(crate) fn name(self) -> &'static str {
        match self {
            PhaseName::Idle => "idle",
            PhaseName::Downloading => "downloading",
            PhaseName::Verifying => "verifying",
            PhaseName::Unpacking => "unpacking",
            PhaseName::Installing => "installing",
            PhaseName::Soaking => "soaking",
            PhaseName::Committed => "committed",
            PhaseName::RollingBack => "rolling_back",
            PhaseName::RolledBack => "rolled_back",
            PhaseName::Rejected => "rejected",
            PhaseName::Recovering => "recovering",
            PhaseName::NeedsAttention => "needs_attention",
        }
    }
}

/// The phase with what it concerns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PhaseReport {
    pub(crate) name: PhaseName,
    /// Downloading: percent of the tarball verified so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) percent: Option<u8>,
    /// The release and version it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) version: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) detail: String,
}

impl PhaseReport {
    pub(crate) fn idle() -> PhaseReport {
        PhaseReport {
            name: PhaseName::Idle,
            percent: None,
            release: None,
            version: None,
            detail: String::new(),
        }
    }
}

/// The last outcome, as the install engine recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OutcomeReport {
    /// committed, rolled_back, rejected, needs_attention
    pub(crate) outcome: String,
    pub(crate) release: String,
    pub(crate) version: String,
    #[serde(default)]
    pub(crate) sequence: Option<u64>,
    #[serde(default)]
    pub(crate) reason: Option<String>,
    pub(crate) at: String,
    /// How long each step of the install took, in order (absent from
    /// outcomes reached without an install, e.g. a rejected offer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) steps: Vec<StepReport>,
    /// Rolled back: the step that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) failed_step: Option<String>,
}

/// One step of an install and how long it took.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StepReport {
    /// verifying, unpacking, installing, restarting, soaking, committing,
    /// rolling_back
    pub(crate) step: String,
    pub(crate) ms: u64,
}

/// The retained state of a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DeviceStatus {
    pub(crate) v: u32,
    pub(crate) device: String,
    pub(crate) fleet: String,
    #[serde(default)]
    pub(crate) groups: Vec<String>,
    pub(crate) agent_version: String,
    /// What the node executes, as it reports it (`None`: not reachable).
    pub(crate) running: Option<String>,
    /// The release the node boots (release_handler's permanent one).
    pub(crate) permanent: Option<String>,
    pub(crate) phase: PhaseReport,
    /// The last outcome about a release: never replaced by input that was
    /// discarded (see `discarded`).
    pub(crate) last_outcome: Option<OutcomeReport>,
    /// Messages on the device's topics that it dropped before believing
    /// anything in them (unsigned or malformed offers, unreadable commands,
    /// messages above its packet limit), counted since the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) discarded: Option<DiscardedReport>,
    /// The answer to the latest `dry_run` command (in memory only: gone
    /// after an agent restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dry_run: Option<DryRunAnswer>,
    pub(crate) updated_at: String,
}

/// `{"v":1,"cmd":"dry_run","id":"...","offer":"<envelope>"}`: what would
/// the device do with this offer? The envelope is the offer's payload (the
/// bundle's `manifest.json`) as a string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DryRunRequest {
    pub(crate) v: u32,
    pub(crate) cmd: CommandKind,
    /// Chosen by the operator, echoed in the answer: 1-64 of A-Z a-z 0-9 . _ + -
    pub(crate) id: String,
    pub(crate) offer: String,
}

/// What a device would do with an offer, checked exactly as a real offer
/// is (signatures, intake, policy, disk space, the unpack plan) and
/// changing nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DryRunAnswer {
    pub(crate) id: String,
    /// would_install, would_refuse, would_ignore (decided before, or a
    /// newer offer is being fetched), busy (an install runs)
    pub(crate) verdict: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sequence: Option<u64>,
    /// would_install: hot or cold, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) why: Option<String>,
    /// What it would fetch of the tarball.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) chunks: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) chunks_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) space_needed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) space_free: Option<u64>,
    /// Top-level paths the unpack would create in the release root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) creates: Vec<String>,
    /// Releases the commit would remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) removes: Vec<String>,
    /// Not would_install: why, and the exit code `beamup install` gives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) code: Option<u8>,
    pub(crate) at: String,
}

/// Longest reason for discarded input, in characters: reasons quote what
/// arrived, so they are cut (and their control characters escaped).
pub(crate) const MAX_REASON: usize = 512;

/// Input a device dropped: how many, and the latest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DiscardedReport {
    pub(crate) count: u64,
    /// The topic of the latest one.
    pub(crate) topic: String,
    /// Why the latest one was dropped.
    pub(crate) reason: String,
    pub(crate) at: String,
}

/// Retained on `.../online`; the last will publishes `online: false`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Online {
    pub(crate) v: u32,
    pub(crate) online: bool,
}

/// One event of a device: progress, or the outcome of an offer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Event {
    pub(crate) v: u32,
    /// Increasing per device; a consumer drops repeats (delivery is at
    /// least once).
    pub(crate) id: u64,
    pub(crate) device: String,
    pub(crate) kind: EventKind,
    pub(crate) phase: PhaseName,
    #[serde(default)]
    pub(crate) release: Option<String>,
    #[serde(default)]
    pub(crate) version: Option<String>,
    #[serde(default)]
    pub(crate) sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    pub(crate) at: String,
    /// Outcomes of an install: how long each step took.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) steps: Vec<StepReport>,
}

/// An operator's command to one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Command {
    pub(crate) v: u32,
    pub(crate) cmd: CommandKind,
}

/// What an event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum EventKind {
    /// A step of a transfer or an install.
    Progress,
    /// The final word on an offer (committed, rolled back, rejected, needs
    /// attention).
    Outcome,
}

/// What a command asks of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CommandKind {
    /// Install the last offered release again, even though it was rolled
    /// back (once; a new rollback is final again).
    Retry,
    /// Say what an offer would do, changing nothing ([`DryRunRequest`]).
    DryRun,
}

/// What an operator asks of a campaign's controller. Retained, so that a
/// controller that is not running gets it when it starts; only the latest
/// is kept, and a controller applies one `seq` at most once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignControl {
    pub v: u32,
    /// Increasing (milliseconds since the epoch when it was sent).
    pub seq: u64,
    pub action: ControlAction,
    /// Who sent it (user@host), for the campaign's log.
    #[serde(default)]
    pub by: String,
    pub at: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    /// No new offers; devices already updating finish and are counted.
    Pause,
    /// Offers go on; failures counted so far are accepted.
    Resume,
    /// No new offers, unstarted offers withdrawn, in-flight devices
    /// finish (and the plan's revert, if any, is offered).
    Abort,
}

impl ControlAction {
    pub fn name(self) -> &'static str {
        match self {
            ControlAction::Pause => "pause",
            ControlAction::Resume => "resume",
            ControlAction::Abort => "abort",
        }
    }
}

/// Retained by a running controller; its last will says `online: false`,
/// so a second controller can tell a live one from a dead one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerLease {
    pub v: u32,
    pub online: bool,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub since: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        let t = Topics::new("beamup", "acme");
        assert_eq!(t.device_offer("gw-1"), "beamup/acme/device/gw-1/offer");
        assert_eq!(t.group_offer("eu"), "beamup/acme/group/eu/offer");
        assert_eq!(t.request("gw-1"), "beamup/acme/req/gw-1");
        assert_eq!(
            t.request_filter(true),
            "$share/beamup-serve/beamup/acme/req/+"
        );
        for (topic, want) in [
            (t.device_offer("gw-1"), Topic::DeviceOffer("gw-1".into())),
            (t.group_offer("eu"), Topic::GroupOffer("eu".into())),
            (t.command("gw-1"), Topic::Command("gw-1".into())),
            (t.request("gw-1"), Topic::Request("gw-1".into())),
            (t.data("gw-1"), Topic::Data("gw-1".into())),
            (t.state("gw-1"), Topic::State("gw-1".into())),
            (t.online("gw-1"), Topic::Online("gw-1".into())),
            (t.events("gw-1"), Topic::Events("gw-1".into())),
            (t.campaign_status("c1"), Topic::CampaignStatus("c1".into())),
            (
                t.campaign_control("c1"),
                Topic::CampaignControl("c1".into()),
            ),
            (
                t.campaign_controller("c1"),
                Topic::CampaignController("c1".into()),
            ),
        ] {
            assert_eq!(t.parse(&topic), Some(want), "{topic}");
        }
        for bad in [
            "beamup/other/device/gw-1/offer",
            "beamup/acme/device/gw-1/offer/x",
            "beamup/acme/device/../offer",
            "beamup/acme/req/+",
            "beamup/acmex/req/a",
        ] {
            assert_eq!(t.parse(bad), None, "{bad}");
        }
        let sub = t.device_subscriptions("gw-1", &["eu".into()]);
        assert_eq!(sub.len(), 4);
        assert!(!sub.iter().any(|s| s.contains('+') || s.contains('#')));
        assert_eq!(
            Topics::new("a/b/", "f").state("d"),
            "a/b/f/device/d/state".to_string()
        );
    }

    #[test]
    fn a_request_names_its_replies() {
        let r = ChunkRequest {
            v: 1,
            bundle: String::new(),
            chunk: 2,
            offset: 131072,
            len: 65536 * 2 + 100,
            piece: Some(65536),
            wait_ms: None,
        };
        assert_eq!(
            r.replies().collect::<Vec<_>>(),
            [(131072, 65536), (196608, 65536), (262144, 100)]
        );
        let one = ChunkRequest { piece: None, ..r };
        assert_eq!(one.replies().count(), 1);
        let json = serde_json::to_string(&one).unwrap();
        assert!(!json.contains("piece"), "{json}");
    }

    #[test]
    fn data_replies_round_trip_and_reject_garbage() {
        let id = [7u8; 32];
        let p = encode_data(&id, 65536, b"hello");
        assert_eq!(
            decode_data(&p).unwrap(),
            DataReply::Data {
                bundle: id,
                offset: 65536,
                data: b"hello"
            }
        );
        let e = encode_error(&id, 3, "no such bundle");
        assert!(matches!(
            decode_data(&e).unwrap(),
            DataReply::Error { message, offset: 3, .. } if message == "no such bundle"
        ));
        assert!(decode_data(&p[..10]).is_err());
        let mut bad = p.clone();
        bad[0] = b'X';
        assert!(decode_data(&bad).is_err());
    }

    #[test]
    fn phases_and_kinds_have_their_wire_names() {
        let s = serde_json::to_string(&PhaseName::RolledBack).unwrap();
        assert_eq!(s, "\"rolled_back\"");
        assert_eq!(
            serde_json::to_string(&EventKind::Outcome).unwrap(),
            "\"outcome\""
        );
        let c: Command = serde_json::from_str(r#"{"v":1,"cmd":"retry"}"#).unwrap();
        assert_eq!(c.cmd, CommandKind::Retry);
        assert!(serde_json::from_str::<Command>(r#"{"v":1,"cmd":"reboot"}"#).is_err());
        // A dry run reads as a command first (its kind), then in full.
        let text = r#"{"v":1,"cmd":"dry_run","id":"dry-1","offer":"{\"signed\":{}}"}"#;
        let c: Command = serde_json::from_str(text).unwrap();
        assert_eq!(c.cmd, CommandKind::DryRun);
        let r: DryRunRequest = serde_json::from_str(text).unwrap();
        assert_eq!(
            (r.id.as_str(), r.offer.as_str()),
            ("dry-1", r#"{"signed":{}}"#)
        );
        assert!(
            serde_json::from_str::<DryRunRequest>(r#"{"v":1,"cmd":"dry_run","id":"x"}"#).is_err()
        );
    }
}
