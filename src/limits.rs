//! Every size bound beamup puts on what it reads, in one struct.
//!
//! Input is hostile until verified, and some of it is never verified (a
//! node's replies, a broker's messages, a health endpoint's answer): each
//! read of it is bounded, and what exceeds a bound is refused (or, for a
//! health response, not read) before memory is allocated for it.
//! The bounds live here, one documented field each, grouped by where the
//! input comes from, so that they can be read and compared in one place;
//! the code refers to them as `LIMITS.field`. Changing a value changes what
//! a device accepts: the doc comment says why it is what it is.
//!
//! Not here, because they bound nothing that is read: buffer sizes, cache
//! sizes, how much of a text is shown in a message, retry counts and
//! timeouts.

/// The size bounds on input; [`LIMITS`] is the one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    // Signed documents: bundles, manifests, trust roots.
    /// Largest manifest (its signed envelope) a device reads, wherever it
    /// comes from: a bundle's `manifest.json`, an offer over MQTT, a
    /// campaign's stored offer. About 200k chunk digests; checked before
    /// the envelope is parsed.
    pub(crate) manifest_bytes: u64,
    /// Largest release tarball a manifest may describe. Larger claims are
    /// refused before anything is allocated or downloaded.
    pub(crate) tarball_bytes: u64,
    /// Largest unpacked size (the files inside the tarball, summed) a
    /// manifest may claim; refused like [`Limits::tarball_bytes`]. The
    /// unpack is then held to the claim (a gzip bomb is refused), and the
    /// device checks it has that much free space.
    pub(crate) unpacked_bytes: u64,
    /// Smallest chunk size a manifest may name: every chunk has a digest
    /// in the manifest and costs a message over MQTT.
    pub(crate) chunk_size_min: u32,
    /// Largest chunk size a manifest may name, and the largest piece
    /// `beamup serve` sends: a chunk is checked whole against its digest
    /// before it is used, and a data reply of a whole chunk must fit
    /// [`Limits::mqtt_packet_bytes`].
    pub(crate) chunk_size_max: u32,
    /// Most parts an indexed tarball may have (one per top-level unit:
    /// `lib/APP-VSN`, `releases/VSN`, `bin/NAME`, `erts-VSN`, ...); far
    /// more than a release has.
    pub(crate) manifest_parts: usize,
    /// Most applications a manifest may list; far more than a release has.
    pub(crate) manifest_apps: usize,
    /// Most signatures an envelope may carry; each costs a verification,
    /// and a hostile file could otherwise carry millions.
    pub(crate) envelope_signatures: usize,
    /// Most keys a trust root may list; a root lists a handful.
    pub(crate) root_keys: usize,

    // Tarball entries, and the release files inside them.
    /// Most entries a release tarball may have (OTP releases have
    /// thousands).
    pub(crate) tar_entries: u64,
    /// Longest entry name in a release tarball, in bytes (Linux's
    /// `PATH_MAX`).
    pub(crate) tar_path_bytes: usize,
    /// Largest release metadata file (`.rel`, `relup`) read whole from a
    /// tarball; metadata files are small, anything larger is not one.
    pub(crate) tar_metadata_bytes: u64,
    /// Largest tar extension header (GNU long name or link, PAX) that
    /// `beamup bundle`'s indexer reads into memory; a path is at most
    /// [`Limits::tar_path_bytes`].
    #[cfg(feature = "operator")]
    pub(crate) tar_extension_bytes: u64,
    /// Deepest nesting of an Erlang text term (release files: `.rel`,
    /// `relup`, `RELEASES`, `.appup`); the reader recurses once per level,
    /// and OTP writes a few levels.
    pub(crate) text_term_depth: usize,

    // Files on disk.
    /// Largest trust root file; a root lists a handful of keys, anything
    /// near this is not a root.
    pub(crate) root_file_bytes: u64,
    /// Largest key file, or secret key's text in an environment variable;
    /// a key file is about 150 bytes.
    pub(crate) key_file_bytes: u64,
    /// Largest `agent.toml`.
    pub(crate) config_file_bytes: u64,
    /// Largest node cookie file (`[node] cookie_file`); a cookie is one
    /// short line.
    pub(crate) cookie_file_bytes: u64,
    /// Largest MQTT password file (`[mqtt] password_file`); its first line
    /// is the password.
    pub(crate) password_file_bytes: u64,
    /// Largest `state.json` (the journal, the outcome history, the releases
    /// decided, what each install created).
    pub(crate) state_file_bytes: u64,
    /// Largest outbox entry (one message waiting for its PUBACK).
    pub(crate) outbox_entry_bytes: u64,
    /// Most messages the outbox keeps: when the broker stays away for long,
    /// the oldest progress messages go first; outcomes are kept.
    pub(crate) outbox_entries: usize,
    /// Largest release file read from a release root (`.rel`, `RELEASES`,
    /// `start_erl.data`); metadata files are small, anything larger is not
    /// one.
    pub(crate) release_file_bytes: u64,
    /// Most release directories (`releases/VSN/`) in a release root; more
    /// than any device keeps, beyond it the root is refused.
    pub(crate) release_dirs: usize,
    /// Largest `relup` of the running release read from its root (for the
    /// versions it downgrades to).
    pub(crate) relup_file_bytes: u64,
    /// Largest `.rel` or `.appup` file `beamup relup` reads; they are
    /// small, anything larger is not one.
    #[cfg(feature = "operator")]
    pub(crate) relup_input_file_bytes: u64,
    /// Largest `beamup rehearse --config` file.
    #[cfg(feature = "operator")]
    pub(crate) rehearse_config_bytes: u64,
    /// Largest campaign state (`campaign.json`); it holds a row per device
    /// of the fleet.
    #[cfg(feature = "operator")]
    pub(crate) campaign_state_bytes: u64,
    /// Largest campaign plan (`campaign start PLAN`): waves may list
    /// devices by id, some tens of bytes each.
    #[cfg(feature = "operator")]
    pub(crate) campaign_plan_bytes: u64,
    /// Largest record of the last sequence number issued (`beamup
    /// bundle`); it is a line of JSON.
    #[cfg(feature = "operator")]
    pub(crate) sequence_record_bytes: u64,

    // Network: MQTT.
    /// Largest MQTT packet, either way. What we accept from the broker: a
    /// manifest ([`Limits::manifest_bytes`] at most) or a data reply of the
    /// largest chunk, plus headers (MQTT 5 tells the broker; the agent's
    /// connection guard drops a larger message unread). What we send: the
    /// same (MQTT 5: further bounded by the broker's Maximum Packet Size
    /// from CONNACK).
    pub(crate) mqtt_packet_bytes: u32,

    // Network: chunk requests.
    /// Most pieces one chunk request asks for: a piece is at most a chunk,
    /// so one request costs a server at most this many chunks of memory,
    /// whatever it claims.
    pub(crate) chunk_request_pieces: usize,
    /// Largest chunk request `beamup serve` reads. A request is about 150
    /// bytes; anything much larger is not one, and is dropped before it is
    /// queued, so that a flood of padded requests cannot fill the queue
    /// with megabytes each.
    #[cfg(feature = "operator")]
    pub(crate) chunk_request_bytes: usize,
    /// Most chunk requests `beamup serve` holds waiting for its worker;
    /// more are dropped (the device asks again after its timeout). Enough
    /// for a fleet of thousands asking at once (each device's first
    /// request): with 1,024, a 10,000-device campaign dropped 12,000
    /// requests, and the devices that backed off finished 30 s late. At
    /// most 16 MiB held (each a copy of at most `chunk_request_bytes`).
    #[cfg(feature = "operator")]
    pub(crate) queued_chunk_requests: usize,

    // Network: the node's distribution frames and terms.
    /// Largest frame accepted from the node, read into memory whole (the
    /// default of `ConnectOptions::max_frame_len`). release_handler's
    /// replies are a few KiB; the limit bounds memory if the peer
    /// misbehaves.
    pub(crate) node_frame_bytes: u32,
    /// Most memory the nodes of one decoded term may take. Each node is 40
    /// bytes however few it took on the wire (one byte of a `STRING_EXT`),
    /// so without this a frame of n bytes could decode to about 40 n (a
    /// 1 MiB frame, 40 MiB). release_handler's replies decode to a few
    /// hundred KiB at most; a term that needs more is refused, not decoded.
    pub(crate) node_term_bytes: usize,
    /// Deepest nesting accepted when decoding a term from the node; far
    /// beyond any reply shape release_handler produces, small enough to
    /// never exhaust a task's stack.
    pub(crate) node_term_depth: usize,

    // Health endpoint.
    /// Most of an HTTP health check's response read (the rest is not
    /// read); a health endpoint's answer is small.
    pub(crate) health_response_bytes: usize,
}

/// The bounds beamup applies.
pub(crate) const LIMITS: Limits = Limits {
    manifest_bytes: 16 * 1024 * 1024,
    tarball_bytes: 16 * 1024 * 1024 * 1024,
    unpacked_bytes: 64 * 1024 * 1024 * 1024,
    chunk_size_min: 4 * 1024,
    chunk_size_max: 16 * 1024 * 1024,
    manifest_parts: 100_000,
    manifest_apps: 1024,
    envelope_signatures: 64,
    root_keys: 256,

    tar_entries: 500_000,
    tar_path_bytes: 4096,
    tar_metadata_bytes: 4 * 1024 * 1024,
    #[cfg(feature = "operator")]
    tar_extension_bytes: 1 << 20,
    text_term_depth: 200,

    root_file_bytes: 1024 * 1024,
    key_file_bytes: 4096,
    config_file_bytes: 1024 * 1024,
    cookie_file_bytes: 4096,
    password_file_bytes: 4096,
    state_file_bytes: 16 * 1024 * 1024,
    outbox_entry_bytes: 1024 * 1024,
    outbox_entries: 1000,
    release_file_bytes: 4 * 1024 * 1024,
    release_dirs: 1000,
    relup_file_bytes: 16 * 1024 * 1024,
    #[cfg(feature = "operator")]
    relup_input_file_bytes: 1024 * 1024,
    #[cfg(feature = "operator")]
    rehearse_config_bytes: 64 * 1024,
    #[cfg(feature = "operator")]
    campaign_state_bytes: 1 << 30,
    #[cfg(feature = "operator")]
    campaign_plan_bytes: 16 * 1024 * 1024,
    #[cfg(feature = "operator")]
    sequence_record_bytes: 64 * 1024,

    mqtt_packet_bytes: 16 * 1024 * 1024 + 64 * 1024,

    chunk_request_pieces: 8,
    #[cfg(feature = "operator")]
    chunk_request_bytes: 1024,
    #[cfg(feature = "operator")]
    queued_chunk_requests: 16 * 1024,

    node_frame_bytes: 1 << 20,
    node_term_bytes: 8 << 20,
    node_term_depth: 256,

    health_response_bytes: 64 * 1024,
};

// A data reply of the largest chunk, or the largest manifest, fits a packet
// with room for its headers; a chunk size can be chosen.
const _: () = assert!(LIMITS.chunk_size_max < LIMITS.mqtt_packet_bytes);
const _: () = assert!(LIMITS.manifest_bytes < LIMITS.mqtt_packet_bytes as u64);
const _: () = assert!(LIMITS.chunk_size_min <= LIMITS.chunk_size_max);
