//! The dependency rules of `src/` (ARCHITECTURE.md, "Dependency rules"),
//! checked over the `crate::` paths of every source file: each top-level
//! module imports only modules of a lower layer (so there are no cycles),
//! `trust/` and `release/` know nothing of tokio, MQTT or the node, and
//! nothing but the command line reaches the operator side.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, bottom first. A module may import modules of lower layers
/// only.
const LAYERS: &[&[&str]] = &[
    &["error", "durations", "limits", "logging", "memory"],
    &["fsutil"],
    &["trust", "release"],
    &["bundle"],
    &["transport", "node"],
    &["staging", "health"],
    &["config"],
    &["engine"],
    &["device"],
    // Above the device: `rehearse` provisions a root as `beamup unpack` does.
    &["operator"],
    &["simulate"],
    &["cli"],
    // The fuzz targets' entry points (feature `fuzzing`): reach everything.
    &["fuzzing"],
];

/// Text that must not appear in the pure layers.
const NOT_IN_PURE: &[&str] = &["tokio::", "rumqttc", "crate::node", "crate::transport"];

struct Use {
    file: PathBuf,
    line: usize,
    target: String,
}

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level module a file belongs to (`src/engine/install.rs` ->
/// `engine`), `None` for `lib.rs` and `main.rs`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code lines of a file (comments dropped), up to its unit tests.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .take_while(|(_, l)| l.trim() != "mod tests {")
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l))
}

fn uses(src: &Path) -> BTreeMap<String, Vec<Use>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut out: BTreeMap<String, Vec<Use>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(src, &file) else {
            continue;
        };
        let text = fs::read_to_string(&file).unwrap();
        for (line, code) in code_lines(&text) {
            for (i, _) in code.match_indices("crate::") {
                let target: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if target != module {
                    out.entry(module.clone()).or_default().push(Use {
                        file: file.clone(),
                        line,
                        target,
                    });
                }
            }
        }
    }
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn every_module_imports_only_lower_layers() {
    let mut wrong = Vec::new();
    for (module, uses) in uses(&src()) {
        let Some(own) = layer(&module) else {
            wrong.push(format!(
                "src/{module}: not in any layer; add it to LAYERS here and to ARCHITECTURE.md"
            ));
            continue;
        };
        for u in uses {
            match layer(&u.target) {
                Some(l) if l < own => {}
                _ => wrong.push(format!(
                    "{}:{}: {module} imports crate::{} (layer {:?}, its own {own})",
                    u.file.display(),
                    u.line,
                    u.target,
                    layer(&u.target)
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "dependency rules broken:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn trust_and_release_know_nothing_of_tokio_mqtt_or_the_node() {
    let mut wrong = Vec::new();
    for dir in ["trust", "release"] {
        let mut files = Vec::new();
        rust_files(&src().join(dir), &mut files);
        for file in files {
            let text = fs::read_to_string(&file).unwrap();
            for (line, code) in code_lines(&text) {
                for bad in NOT_IN_PURE {
                    if code.contains(bad) {
                        wrong.push(format!("{}:{line}: {bad}", file.display()));
                    }
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn only_the_command_line_reaches_the_operator_side() {
    let wrong: Vec<String> = uses(&src())
        .into_iter()
        .filter(|(m, _)| m != "cli" && m != "operator" && m != "fuzzing")
        .flat_map(|(m, uses)| {
            uses.into_iter()
                .filter(|u| u.target == "operator")
                .map(move |u| {
                    format!(
                        "{}:{}: {m} imports the operator side",
                        u.file.display(),
                        u.line
                    )
                })
        })
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The check itself sees what it must: a cycle planted in a scratch tree
/// is reported with its file and line.
#[test]
fn the_check_reports_an_upward_import() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path();
    fs::create_dir_all(s.join("release")).unwrap();
    fs::write(
        s.join("release/mod.rs"),
        "use crate::engine::install;\n// crate::cli in a comment\n",
    )
    .unwrap();
    fs::write(s.join("engine.rs"), "use crate::release::manifest;\n").unwrap();
    let u = uses(s);
    let release: Vec<(usize, &str)> = u["release"]
        .iter()
        .map(|u| (u.line, u.target.as_str()))
        .collect();
    assert_eq!(release, [(1, "engine")]);
    assert!(layer("engine") > layer("release"));
}
