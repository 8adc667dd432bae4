//! `agent.toml`: where the release lives, how to reach and restart its node,
//! how to tell it is healthy, whom to trust, where to keep state.
//!
//! Unknown keys are errors (a typo such as `soka = "5s"` must not silently
//! disable the soak), and every error names the file, the line and the table.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::fsutil;
pub(crate) use crate::health::HealthConfig;
use crate::limits::LIMITS;
use crate::release::manifest::is_safe_name;
use crate::transport::mqtt::Broker;
use crate::transport::protocol::is_topic_name;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) release: ReleaseConfig,
    pub(crate) node: NodeConfig,
    pub(crate) health: HealthConfig,
    pub(crate) trust: TrustConfig,
    pub(crate) state: StateConfig,
    #[serde(default)]
    pub(crate) install: InstallConfig,
    pub(crate) mqtt: Option<MqttConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReleaseConfig {
    /// The release root: holds `bin/`, `lib/`, `releases/`.
    pub(crate) root: PathBuf,
    pub(crate) name: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NodeConfig {
    /// The node's full name, `name@host`.
    pub(crate) name: String,
    pub(crate) cookie_file: Option<PathBuf>,
    pub(crate) cookie: Option<String>,
    /// Shell command that starts the node (detached), run with `sh -c`.
    pub(crate) start: String,
    /// Shell command that stops the node, run with `sh -c`.
    pub(crate) stop: String,
    /// EPMD port; defaults to `ERL_EPMD_PORT` or 4369.
    pub(crate) epmd_port: Option<u16>,
    /// Timeout of each call to the node.
    #[serde(
        default = "default_call_timeout",
        deserialize_with = "crate::durations::deserialize"
    )]
    pub(crate) call_timeout: Duration,
    /// How long a started node may take to answer.
    #[serde(
        default = "default_start_timeout",
        deserialize_with = "crate::durations::deserialize"
    )]
    pub(crate) start_timeout: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrustConfig {
    pub(crate) root: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StateConfig {
    pub(crate) dir: PathBuf,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Strategy {
    /// Hot when a relup covers the running version and ERTS is unchanged,
    /// otherwise cold (restart into the new release).
    #[default]
    Auto,
    /// Refuse anything that needs a restart.
    HotOnly,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InstallConfig {
    #[serde(default)]
    pub(crate) strategy: Strategy,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MqttConfig {
    pub(crate) url: String,
    pub(crate) device_id: String,
    pub(crate) fleet: String,
    #[serde(default)]
    pub(crate) groups: Vec<String>,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
    pub(crate) username: Option<String>,
    pub(crate) password_file: Option<PathBuf>,
    /// Topic prefix; topics are `PREFIX/FLEET/...`.
    #[serde(default = "default_prefix")]
    pub(crate) prefix: String,
    /// MQTT protocol version: "5" (default) or "3.1.1".
    pub(crate) version: Option<String>,
}

fn default_prefix() -> String {
    "beamup".into()
}
fn default_call_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_start_timeout() -> Duration {
    Duration::from_secs(60)
}

impl Config {
    pub(crate) fn load(path: &Path) -> Result<Config> {
        let bytes = fsutil::read_limited(path, LIMITS.config_file_bytes, "config")?;
        let text = String::from_utf8(bytes).map_err(|_| Error::Config {
            path: path.to_path_buf(),
            detail: "not UTF-8 text".into(),
        })?;
        Self::parse(&text, path)
    }

    pub(crate) fn parse(text: &str, path: &Path) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            detail: describe_toml_error(text, &e),
        })?;
        config.check().map_err(|detail| Error::Config {
            path: path.to_path_buf(),
            detail,
        })?;
        Ok(config)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if !is_safe_name(&self.release.name) {
            return Err(format!(
                "[release] name {:?} is not a plain release name",
                self.release.name
            ));
        }
        if !self.release.root.is_absolute() {
            return Err(format!(
                "[release] root {:?} must be an absolute path",
                self.release.root
            ));
        }
        if !self.node.name.contains('@') {
            return Err(format!(
                "[node] name {:?} must be a full node name such as \"{}@localhost\"",
                self.node.name, self.release.name
            ));
        }
        match (&self.node.cookie, &self.node.cookie_file) {
            (Some(_), Some(_)) => {
                return Err("[node] has both cookie and cookie_file; keep one".into());
            }
            (None, None) => return Err("[node] needs cookie_file (or cookie)".into()),
            _ => {}
        }
        let h = &self.health;
        if h.http.is_none() && h.tcp.is_none() && h.command.is_none() {
            return Err("[health] needs at least one check: http, tcp or command".into());
        }
        if let Some(url) = &h.http {
            crate::health::HttpTarget::parse(url).map_err(|e| format!("[health] http: {e}"))?;
        }
        if h.expect_version && h.http.is_none() {
            return Err("[health] expect_version needs an http check".into());
        }
        if h.soak >= h.timeout {
            return Err(format!(
                "[health] soak ({}) must be shorter than timeout ({})",
                humantime::format_duration(h.soak),
                humantime::format_duration(h.timeout)
            ));
        }
        if let Some(m) = &self.mqtt {
            for (what, v) in [("device_id", &m.device_id), ("fleet", &m.fleet)] {
                if !is_topic_name(v) {
                    return Err(format!(
                        "[mqtt] {what} {v:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
                    ));
                }
            }
            crate::transport::mqtt::parse_url(&m.url).map_err(|e| format!("[mqtt] url: {e}"))?;
            if let Some(v) = &m.version {
                crate::transport::mqtt::Version::parse(v)
                    .map_err(|e| format!("[mqtt] version: {e}"))?;
            }
            if !is_safe_prefix(&m.prefix) {
                return Err(format!(
                    "[mqtt] prefix {:?} must be names of A-Z a-z 0-9 . _ - separated by /",
                    m.prefix
                ));
            }
            if let Some(g) = m.groups.iter().find(|g| !is_topic_name(g)) {
                return Err(format!(
                    "[mqtt] group {g:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
                ));
            }
        }
        Ok(())
    }

    /// The cookie, read from `cookie_file` when configured.
    pub(crate) fn cookie(&self) -> Result<String> {
        if let Some(c) = &self.node.cookie {
            return Ok(c.clone());
        }
        let path = self.node.cookie_file.as_ref().expect("checked at load");
        let bytes = fsutil::read_limited(path, LIMITS.cookie_file_bytes, "cookie file")?;
        let cookie = String::from_utf8_lossy(&bytes).trim().to_string();
        if cookie.is_empty() {
            return Err(Error::Config {
                path: path.clone(),
                detail: "the cookie file is empty".into(),
            });
        }
        Ok(cookie)
    }

    pub(crate) fn epmd_port(&self) -> u16 {
        self.node.epmd_port.unwrap_or_else(|| {
            std::env::var("ERL_EPMD_PORT")
                .ok()
                .and_then(|p| p.parse().ok())
                .unwrap_or(4369)
        })
    }

    /// What the node link needs: names, the cookie (read now), timeouts,
    /// commands.
    pub(crate) fn link_settings(&self) -> Result<crate::node::link::LinkSettings> {
        Ok(crate::node::link::LinkSettings {
            name: self.node.name.clone(),
            cookie: self.cookie()?,
            epmd_port: self.epmd_port(),
            call_timeout: self.node.call_timeout,
            start_timeout: self.node.start_timeout,
            start: self.node.start.clone(),
            stop: self.node.stop.clone(),
            root: self.release.root.clone(),
        })
    }

    /// The device's identity for target scopes, when MQTT names one.
    pub(crate) fn identity(&self) -> Option<crate::release::policy::Identity> {
        self.mqtt
            .as_ref()
            .map(|m| crate::release::policy::Identity {
                fleet: Some(m.fleet.clone()),
                device: Some(m.device_id.clone()),
                groups: m.groups.clone(),
            })
    }
}

/// A topic prefix: one or more safe names joined by `/` (no wildcards,
/// no empty levels, no `$` at the start).
pub(crate) fn is_safe_prefix(p: &str) -> bool {
    !p.is_empty() && p.len() <= 128 && p.split('/').all(is_topic_name)
}

/// One line: where (line, table) and what, from toml's error.
pub(crate) fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else { return msg };
    let start = span.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    // Up to the end of the error's line: a missing key points at its table header.
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let table = text[..line_end]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'));
    match table {
        Some(t) => format!("line {line} in {t}: {msg}"),
        None => format!("line {line}: {msg}"),
    }
}

impl MqttConfig {
    /// The broker connection these settings describe.
    pub(crate) fn broker(&self) -> Result<Broker> {
        let m = self;
        let version = match &m.version {
            None => crate::transport::mqtt::Version::V5,
            Some(v) => crate::transport::mqtt::Version::parse(v).map_err(Error::Usage)?,
        };
        Ok(Broker {
            url: m.url.clone(),
            version,
            ca_file: m.ca_file.clone(),
            cert_file: m.cert_file.clone(),
            key_file: m.key_file.clone(),
            username: m.username.clone(),
            password_file: m.password_file.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[release]
root = "/opt/thermo"
name = "thermo"
[node]
name = "thermo@localhost"
cookie_file = "/opt/thermo/releases/COOKIE"
start = "/opt/thermo/bin/thermo daemon"
stop  = "/opt/thermo/bin/thermo stop"
[health]
http = "http://127.0.0.1:8081/health"
expect_version = true
timeout = "10s"
soak = "5s"
[trust]
root = "/etc/beamup/root.json"
[state]
dir = "/var/lib/beamup"
"#;

    fn parse(text: &str) -> std::result::Result<Config, String> {
        Config::parse(text, Path::new("agent.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.health.soak, Duration::from_secs(5));
        assert_eq!(c.install.strategy, Strategy::Auto);
        assert!(c.mqtt.is_none());
    }

    #[test]
    fn unknown_key_names_key_line_and_table() {
        let text = GOOD.replace("soak = \"5s\"", "soka = \"5s\"");
        let e = parse(&text).unwrap_err();
        assert!(
            e.starts_with(
                "agent.toml: invalid configuration: line 14 in [health]: unknown field `soka`"
            ),
            "{e}"
        );
    }

    #[test]
    fn missing_key_is_named() {
        let text = GOOD.replace("stop  = \"/opt/thermo/bin/thermo stop\"\n", "");
        let e = parse(&text).unwrap_err();
        assert!(e.contains("missing field `stop`"), "{e}");
        assert!(e.contains("[node]"), "{e}");
    }

    #[test]
    fn semantic_errors() {
        let e = parse(&GOOD.replace("timeout = \"10s\"", "timeout = \"10 parsecs\"")).unwrap_err();
        assert!(e.contains("not a duration"), "{e}");
        let e = parse(&GOOD.replace("soak = \"5s\"", "soak = \"20s\"")).unwrap_err();
        assert!(
            e.contains("soak (20s) must be shorter than timeout (10s)"),
            "{e}"
        );
        let e =
            parse(&GOOD.replace("name = \"thermo@localhost\"", "name = \"thermo\"")).unwrap_err();
        assert!(e.contains("full node name"), "{e}");
    }
}
