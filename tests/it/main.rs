//! The integration tests: one binary (link time adds up, and the OTP test
//! releases are built once per run, see `support::otp`), one module per
//! capability, all driving real components. Helpers that hold no tests
//! live in `support/`.

/// `beamup campaign` over real devices, `serve` and mosquitto: waves,
/// soaks, thresholds, offline devices, timeouts, pause/resume/abort, a
/// controller killed with -9 at random points, a broker restarted without
/// persistence, the shipped ACL, the dry run of an offer.
mod campaign;
/// Chaos: real and simulated devices under random faults (broker, agents,
/// nodes, `serve`, controllers killed); the fleet view and the campaign
/// reports must equal what devices and nodes say.
mod chaos;
/// Real nodes booted in podman from `containers/pod.yaml`: provisioning,
/// a hot upgrade over MQTT, restarts that boot the permanent release.
mod containers;
/// The distribution protocol against real `erl` nodes and `epmd`.
mod dist;
/// Hostile input from the network (MQTT 5 and 3.1.1): junk, forged,
/// replayed, foreign and oversize messages on a device's topics, floods of
/// data replies, hostile requests to `serve`; the device and its node stay
/// as they were.
mod hostile;
/// A hostile peer in place of the node (its own EPMD, a correct
/// handshake, then frames no node sends): `beamup status` reports it.
mod hostile_node;
/// `beamup install` on the thermo (rebar3) release: hot, cold, rollbacks,
/// hostile bundles, beamup killed at every step, each ending with the node
/// restarted from disk.
mod install;
/// The source layout's dependency rules (ARCHITECTURE.md).
mod layout;
/// The agent, `serve`, `offer` and `fleet` against a real mosquitto.
mod mqtt;
/// The thermo fixture itself.
mod otp_release;
/// `scripts/cd-release` end to end: build, relup, rehearse, bundle with
/// the key from the environment, serve, campaign on real agents; a failed
/// rehearsal that ships nothing; a cold release.
mod pipeline;
/// `beamup rehearse` on the thermo and thermex fixtures: the good upgrade,
/// each way an upgrade fails, cold from-versions, nothing left running.
mod rehearse;
/// Every release shape's fixture (rebar3, rebar3 without ERTS, mix).
mod release_flavors;
/// `beamup relup` on mix and rebar3 output, checked by release_handler.
mod relup;
/// Campaigns over a few hundred simulated devices (`beamup fleet
/// simulate`): thresholds on the right counts, each outcome once, no
/// device offered twice.
mod scale;
/// The install suite on a mix root and a relx root without ERTS.
mod shapes;
/// Keys, roots, bundles and verification on real files.
mod signing;
mod support;
/// The units under a real systemd in systemd-nspawn.
mod systemd;
/// `beamup unpack`: provisioning and staging without a node.
mod unpack;
