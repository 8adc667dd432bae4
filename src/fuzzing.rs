//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, not a
//! stable interface). Each forwards to the code a device or an operator
//! runs on untrusted bytes, so that the fuzzers exercise the real parsers;
//! nothing here parses by itself.

use std::path::Path;
use std::time::SystemTime;

use crate::bundle::{self, Bundle, Frame};
use crate::config::Config;
use crate::error::Result;
use crate::node::dist::{DecodeError, Term};
use crate::operator::campaign::{decide, plan, roster, state::Campaign, state::Target, view};
use crate::operator::fleet;
use crate::release::manifest::Manifest;
use crate::release::policy::{self, DeviceFacts, Identity};
use crate::release::{eterm, metadata, releases_file};
use crate::staging::Plan;
use crate::transport::protocol::{self, Topics};
use crate::transport::transfer::{Download, Received};
use crate::trust::keys::SecretKey;
use crate::trust::root::Root;
use crate::trust::signed::{DocKind, Envelope};

/// Keys and the trust root that lists them, for the targets that need
/// something signed.
pub struct Signers {
    pub keys: Vec<SecretKey>,
    pub root: Root,
    /// The root document as `beamup root init` writes it.
    pub root_bytes: Vec<u8>,
}

/// The keys in `key_files` (as `beamup keygen` writes them) and the root
/// in `root_file`, loaded as the operator's commands and a device load them.
pub fn load_signers(key_files: &[std::path::PathBuf], root_file: &Path) -> Result<Signers> {
    let keys = key_files
        .iter()
        .map(|p| SecretKey::load(p))
        .collect::<Result<Vec<_>>>()?;
    let root_bytes =
        std::fs::read(root_file).map_err(|e| crate::error::Error::io(root_file, "read", e))?;
    let root = Root::load(root_file)?;
    Ok(Signers {
        keys,
        root,
        root_bytes,
    })
}

/// `json` (any JSON document, kept byte for byte) as the signed body of a
/// manifest envelope signed by `keys`; `None` when it is not JSON.
pub fn sign_manifest(json: &str, keys: &[SecretKey]) -> Option<Vec<u8>> {
    let raw = serde_json::value::RawValue::from_string(json.to_string()).ok()?;
    Some(Envelope::sign(DocKind::Manifest, &raw, keys).to_bytes())
}

/// `bundle::verify_envelope`: an offer's payload, or a bundle's first
/// member, checked against `root`.
pub fn verify_envelope(bytes: &[u8], root: &Root) -> Result<Manifest> {
    bundle::verify_envelope(bytes, root, "fuzzed envelope").map(|(m, _)| m)
}

/// `policy::check` for a device that runs `installed`, committed
/// `last_sequence` and is `device` in fleet `fleet`, group `group`.
pub fn admit(
    m: &Manifest,
    now: SystemTime,
    installed: Option<&str>,
    last_sequence: Option<u64>,
    identity: Option<(&str, &str, &str)>,
) -> Result<()> {
    let device = DeviceFacts {
        installed_version: installed.map(str::to_string),
        last_sequence,
        identity: identity.map(|(device, fleet, group)| Identity {
            fleet: Some(fleet.into()),
            device: Some(device.into()),
            groups: vec![group.into()],
        }),
    };
    policy::check(m, now, &device)
}

/// A trusted root's check of a successor root (`beamup root verify`, and a
/// device taking a rotated root).
pub fn root_successor(trusted: &Root, bytes: &[u8], path: &Path) -> Result<Root> {
    trusted.verify_successor(bytes, path)
}

/// A bundle file's bytes around `envelope` and `tarball`, laid out as
/// `beamup bundle` and a download lay them out.
pub fn bundle_bytes(envelope: &[u8], tarball: &[u8]) -> Vec<u8> {
    let frame = Frame::new(envelope, tarball.len() as u64, 0);
    [&frame.head[..], tarball, &frame.tail].concat()
}

/// A manifest of release `x` 1 (app `x-1`) for these tarball bytes, with
/// their digests, target `any`.
pub fn manifest_for(tarball: &[u8], chunk_size: u32) -> Manifest {
    crate::release::manifest::for_tests(tarball, chunk_size)
}

/// The streaming check of a whole tarball against a verified manifest.
pub fn verify_tarball(b: &Bundle, m: &Manifest) -> Result<()> {
    b.verify_tarball(m)
}

/// The provisioning plan (`beamup unpack` into an empty directory): every
/// unit the tarball holds, read through the chunk verifier.
pub fn plan_all(root: &Path, m: &Manifest, b: &Bundle) -> Result<Plan> {
    crate::staging::plan_all(root, m, b)
}

/// What a failed unpack leaves is removed as recovery removes it.
pub fn remove_planned(root: &Path, p: &Plan) -> Result<()> {
    crate::staging::remove(root, p)
}

/// The paths a plan creates, relative to the root.
pub fn plan_creates(p: &Plan) -> Vec<std::path::PathBuf> {
    p.creates.clone()
}

/// The external term format, as the distribution connection decodes it: one
/// term with its version byte, filling `bytes`.
pub fn etf_decode(bytes: &[u8]) -> std::result::Result<Term, DecodeError> {
    Term::decode(bytes)
}

/// The encoder used for every term beamup sends a node.
pub fn etf_encode(t: &Term) -> Vec<u8> {
    t.encode()
}

/// One distribution frame (what follows its 4-byte length) as the
/// connection's reader handles it, with one call pending whose reply
/// reference is words 3, 5 and 99 of node `fuzz@localhost`, creation 1
/// (its pid: `<1.0>` there). `Ok(Some(_))`: the
/// pending call got this reply.
pub fn dist_frame(
    buf: &[u8],
) -> std::result::Result<Option<std::result::Result<Term, String>>, String> {
    crate::node::dist::connection_fuzzing::frame(buf)
}

/// The client side of the distribution handshake on `stream`.
pub async fn dist_handshake(
    stream: &mut tokio::net::TcpStream,
    cookie: &str,
) -> std::result::Result<String, crate::node::dist::DistError> {
    crate::node::dist::handshake::handshake(stream, "peer@localhost", "fuzz@localhost", 1, cookie)
        .await
        .map(|p| p.name)
}

/// An EPMD `PORT_PLEASE2` lookup against the EPMD at `addr`.
pub async fn epmd_lookup(
    addr: std::net::SocketAddr,
    name: &str,
) -> std::result::Result<u16, crate::node::dist::DistError> {
    crate::node::dist::epmd::port_please_at(&[addr], "localhost", addr.port(), name)
        .await
        .map(|e| e.port)
}

/// What the release-file readers make of `text`: every term (`file:consult`
/// as beamup reads it), then the text as a `.rel`, a relup of `version`,
/// RELEASES (which beamup also writes: `format_releases` of what was read
/// must read back the same) and `start_erl.data`.
pub fn erlang_text(text: &str, version: &str) -> std::result::Result<(), String> {
    let _ = eterm::parse_terms(text);
    let _ = metadata::parse_rel(text);
    let _ = metadata::parse_relup(text, version);
    let _ = releases_file::parse_start_erl(text);
    if let Ok(entries) = releases_file::parse_releases(text) {
        let written = releases_file::format_releases(&entries);
        match releases_file::parse_releases(&written) {
            Ok(again) if again == entries => {}
            Ok(again) => {
                return Err(format!(
                    "RELEASES read back differently:\n{entries:?}\n{again:?}\nwritten:\n{written}"
                ));
            }
            Err(e) => return Err(format!("RELEASES written unreadable ({e}):\n{written}")),
        }
    }
    Ok(())
}

/// `agent.toml` as the agent loads it, with what it derives from it
/// without touching files or the network.
pub fn agent_toml(text: &str) -> Result<()> {
    let c = Config::parse(text, Path::new("agent.toml"))?;
    let _ = c.identity();
    if let Some(m) = &c.mqtt {
        let b = m.broker()?;
        crate::transport::mqtt::parse_url(&b.url).map_err(crate::error::Error::Usage)?;
        let topics = Topics::new(&m.prefix, &m.fleet);
        let _ = topics.device_subscriptions(&m.device_id, &m.groups);
    }
    let _ = crate::health::Checks::new(&c.health, "1.0.0");
    Ok(())
}

/// A download of one manifest's tarball into a directory, as the agent
/// runs it, fed data replies from the broker.
pub struct DataSink {
    download: Download,
}

impl DataSink {
    /// Starts a download of `m` (whose envelope is `envelope`) into `dir`,
    /// every chunk needed, in pieces of `piece` bytes.
    pub fn open(dir: &Path, envelope: &[u8], m: &Manifest, piece: u32) -> Result<DataSink> {
        let need = vec![true; m.tarball.chunks.len()];
        let download = Download::open(
            dir,
            envelope,
            m,
            need,
            piece,
            64,
            std::time::Duration::from_secs(3600),
        )?;
        Ok(DataSink { download })
    }

    /// Asks for the next pieces (as the agent's request tick does); returns
    /// their (offset, len).
    pub fn request(&mut self) -> Vec<(u64, u32)> {
        self.download
            .window
            .next_requests(std::time::Instant::now())
            .into_iter()
            .map(|p| (p.offset, p.len))
            .collect()
    }

    /// A message on the data topic: decoded, and taken by the download
    /// when it is a reply for this tarball (as the agent's transfer does).
    /// `Ok(Some(chunk))` when it completed a chunk that verified.
    pub fn reply(&mut self, payload: &bytes::Bytes) -> Result<Option<u32>> {
        let Ok(protocol::DataReply::Data { bundle, offset, .. }) = protocol::decode_data(payload)
        else {
            return Ok(None);
        };
        if &bundle != self.download.tarball_id() {
            return Ok(None);
        }
        let data = payload.slice(protocol::DATA_HEADER..);
        Ok(match self.download.on_data(offset, data)? {
            Received::Verified(c) => Some(c),
            _ => None,
        })
    }

    /// Makes the verified chunks durable (data, then bitmap).
    pub fn checkpoint(&mut self) -> Result<()> {
        self.download.checkpoint()
    }

    /// The chunks the download holds as verified.
    pub fn have(&self) -> Vec<bool> {
        self.download.window.have().to_vec()
    }

    /// The bundle-shaped file being filled.
    pub fn path(&self) -> std::path::PathBuf {
        self.download.path()
    }
}

/// A chunk request as `beamup serve` reads it, for a tarball of
/// `tarball_size` bytes served in pieces of at most `max_piece`: `None`
/// when it is ignored, `Some(None)` when refused, else the replies it gets
/// (offset, len).
pub fn chunk_request(
    payload: &[u8],
    tarball_size: u64,
    max_piece: u32,
) -> Option<Option<Vec<(u64, u32)>>> {
    let req: protocol::ChunkRequest = serde_json::from_slice(payload).ok()?;
    crate::release::manifest::parse_digest(&req.bundle)?;
    if req.v != protocol::VERSION {
        return None;
    }
    // Pieces of at most `max_piece`, the bundle's chunk size.
    crate::operator::serve::plan_replies(&req, Some((tarball_size, max_piece)), max_piece)
        .ok()
        .map(Some)
        .or(Some(None))
}

/// A command as the agent reads it: whether it is a retry it acts on.
pub fn command(payload: &[u8]) -> bool {
    serde_json::from_slice::<protocol::Command>(payload)
        .is_ok_and(|c| c.v == protocol::VERSION && c.cmd == protocol::CommandKind::Retry)
}

/// A campaign over three devices (`gw-1` canary, then `gw-2`, `gw-3`) of
/// fleet `acme`, prefix `beamup`, rolling out thermo 1.1.0 (sequence 77),
/// with the operator's views, fed broker messages as its controller is.
pub struct CampaignFeed {
    campaign: Campaign,
    facts: decide::Facts,
    topics: Topics,
    rows: std::collections::BTreeMap<String, fleet::DeviceRow>,
}

impl Default for CampaignFeed {
    fn default() -> Self {
        Self::new()
    }
}

impl CampaignFeed {
    pub fn new() -> CampaignFeed {
        let p = plan::parse(
            "bundle = \"b\"\nfleet = \"acme\"\n[[waves]]\ndevices = [\"gw-1\"]\nsoak = \"1s\"\n\
             [[waves]]\nrest = true\n[rollout]\norder = \"id\"\nmax_in_flight = 2\n",
            Path::new("/"),
        )
        .expect("the fixed plan parses");
        let mut facts = decide::Facts::default();
        for id in ["gw-1", "gw-2", "gw-3"] {
            facts.devices.insert(
                id.into(),
                roster::DeviceFacts {
                    online: Some(true),
                    state: None,
                },
            );
        }
        let target = Target {
            name: "thermo".into(),
            version: "1.1.0".into(),
            sequence: 77,
            digest: "d1".into(),
        };
        let campaign = decide::create("c".into(), p, target, None, &facts.devices, 1, 0);
        CampaignFeed {
            campaign,
            facts,
            topics: Topics::new("beamup", "acme"),
            rows: Default::default(),
        }
    }

    /// One message on `topic`: into the campaign (`controller::ingest`),
    /// then a controller turn at `now` (ms), and into the rows `beamup
    /// fleet status` shows. Returns the effects of the turn.
    pub fn message(&mut self, topic: &str, payload: &[u8], now: u64) -> usize {
        crate::operator::campaign::controller::ingest(
            &mut self.campaign,
            &mut self.facts,
            &self.topics,
            topic,
            payload,
            now,
        );
        let effects = decide::step(&mut self.campaign, &self.facts, now);
        match self.topics.parse(topic) {
            Some(protocol::Topic::State(d)) => {
                self.row(&d).state = serde_json::from_slice(payload).ok();
            }
            Some(protocol::Topic::Online(d)) => {
                self.row(&d).online = serde_json::from_slice::<protocol::Online>(payload)
                    .ok()
                    .map(|o| o.online);
            }
            _ => {}
        }
        effects.len()
    }

    fn row(&mut self, d: &str) -> &mut fleet::DeviceRow {
        self.rows
            .entry(d.to_string())
            .or_insert_with(|| fleet::DeviceRow {
                device: d.to_string(),
                ..Default::default()
            })
    }

    /// Every view the operator gets: the campaign's status (text, with
    /// devices), report (text, CSV, JSON), and the fleet status table and
    /// JSON.
    pub fn views(&self) -> usize {
        let r = view::report(&self.campaign);
        let rows: Vec<fleet::DeviceRow> = self.rows.values().cloned().collect();
        view::status_text(&r, true).len()
            + view::report_text(&r).len()
            + view::report_csv(&r).len()
            + serde_json::to_string(&r).map_or(0, |s| s.len())
            + fleet::table(&rows).len()
            + serde_json::to_string(&rows).map_or(0, |s| s.len())
    }

    /// The topics of device `id`'s state, online flag and events, of the
    /// campaign's control, and of its offer.
    pub fn topics(&self, id: &str) -> [String; 5] {
        [
            self.topics.state(id),
            self.topics.online(id),
            self.topics.events(id),
            self.topics.campaign_control("c"),
            self.topics.device_offer(id),
        ]
    }
}
