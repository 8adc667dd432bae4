//! A hostile release tarball unpacked as a device unpacks it: through the
//! chunk verifier, the inflater and the tar entry rules, into an empty
//! root beside a directory it must not touch.
//!
//! Input: one mode byte, then the tarball: bit 0 set, the bytes are the
//! gzip stream itself; clear, they are a tar stream the target compresses
//! (so that the fuzzer works on tar headers, not on deflate). Bit 1 picks
//! the plan: the device's upgrade plan (`releases/1`, `bin/x-1`,
//! `lib/x-1`) or provisioning (every unit the tarball holds). Bit 2 set:
//! on one thread (as on a one-core device), not the two-thread pipeline.
//!
//! Properties: nothing appears or changes outside the root; only the
//! planned units appear in it; every symlink in it resolves inside it;
//! after a failure, removing the plan's paths leaves no more than the
//! directories above them.
#![no_main]

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use libfuzzer_sys::fuzz_target;

const SENTINEL: &[u8] = b"left alone\n";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let gz = if mode & 1 == 1 {
        body.to_vec()
    } else {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(body).unwrap();
        e.finish().unwrap()
    };
    if gz.is_empty() {
        return;
    }
    let case = beamup_fuzz::fresh("unpack");
    let root = case.join("root");
    let outside = case.join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("sentinel"), SENTINEL).unwrap();
    let bundle_path = case.join("x.bundle");

    let mut m = beamup::fuzzing::manifest_for(&gz, 4096);
    m.tarball.unpacked_size = 64 << 20;
    let envelope = br#"{"signed":{},"signatures":[]}"#;
    std::fs::write(&bundle_path, beamup::fuzzing::bundle_bytes(envelope, &gz)).unwrap();
    let bundle = beamup::bundle::Bundle::open(&bundle_path).unwrap();

    let plan = if mode & 2 == 0 {
        beamup::staging::plan(&root, "x", &m)
    } else {
        match beamup::fuzzing::plan_all(&root, &m, &bundle) {
            Ok(p) => p,
            Err(_) => {
                check_outside(&case, &outside);
                assert_eq!(entries(&root), Vec::<PathBuf>::new(), "a failed plan wrote");
                return;
            }
        }
    };
    let creates = beamup::fuzzing::plan_creates(&plan);
    let threads = if mode & 4 == 0 { 2 } else { 1 };
    let result = beamup::staging::unpack_on(&root, &plan, &m, &bundle, threads);

    check_outside(&case, &outside);
    for p in all_paths(&root) {
        let rel = p.strip_prefix(&root).unwrap();
        let unit = unit_of(rel);
        assert!(
            creates
                .iter()
                .any(|c| rel.starts_with(c) || c.starts_with(rel)),
            "{} is in no planned unit ({creates:?}; unit {unit:?}; result {result:?})",
            rel.display()
        );
        let meta = p.symlink_metadata().unwrap();
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&p).unwrap();
            let resolved = resolve(&root, rel.parent().unwrap(), &target);
            assert!(
                resolved.is_some(),
                "symlink {} -> {} resolves outside the root (result {result:?})",
                rel.display(),
                target.display()
            );
        }
    }
    if result.is_err() {
        beamup::fuzzing::remove_planned(&root, &plan).unwrap();
        // Left: at most the directories above planned paths (`lib/`,
        // `releases/`, `bin/`, which a device's root has anyway).
        for p in all_paths(&root) {
            let rel = p.strip_prefix(&root).unwrap();
            assert!(
                p.symlink_metadata().unwrap().is_dir()
                    && creates.iter().any(|c| c.starts_with(rel) && c != rel),
                "removing the plan left {}",
                rel.display()
            );
        }
    }
});

/// The case directory holds the root, the untouched directory and the
/// bundle, nothing else; the untouched directory holds the sentinel as it
/// was.
fn check_outside(case: &Path, outside: &Path) {
    let mut top = entries(case);
    top.sort();
    assert_eq!(
        top,
        ["outside", "root", "x.bundle"].map(PathBuf::from).to_vec(),
        "something was written beside the root"
    );
    assert_eq!(entries(outside), vec![PathBuf::from("sentinel")]);
    assert_eq!(std::fs::read(outside.join("sentinel")).unwrap(), SENTINEL);
    assert!(
        !outside
            .join("sentinel")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| PathBuf::from(e.unwrap().file_name()))
        .collect()
}

/// Every path under `dir`, not following symlinks.
fn all_paths(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.symlink_metadata().unwrap().is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

fn unit_of(rel: &Path) -> PathBuf {
    rel.components().take(2).collect()
}

/// Where `target`, read from a symlink in directory `dir` (relative to
/// `root`), leads, following symlinks inside the root as the kernel does;
/// `None` when it leaves the root at any step. Dangling ends count as
/// inside.
fn resolve(root: &Path, dir: &Path, target: &Path) -> Option<PathBuf> {
    let mut hops = 0;
    let mut at: Vec<PathBuf> = dir
        .components()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut todo: Vec<PathBuf> = target
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    if target.is_absolute() {
        return None;
    }
    while let Some(part) = todo.pop() {
        match Path::new(&part).components().next() {
            Some(Component::CurDir) | None => {}
            Some(Component::ParentDir) => {
                at.pop()?;
            }
            Some(Component::RootDir) | Some(Component::Prefix(_)) => return None,
            Some(Component::Normal(_)) => {
                at.push(part);
                let here: PathBuf = at.iter().collect();
                if let Ok(meta) = root.join(&here).symlink_metadata()
                    && meta.file_type().is_symlink()
                {
                    hops += 1;
                    if hops > 40 {
                        return Some(here); // a loop: the kernel gives ELOOP
                    }
                    at.pop();
                    let t = std::fs::read_link(root.join(&here)).ok()?;
                    if t.is_absolute() {
                        return None;
                    }
                    todo.extend(t.components().rev().map(|c| PathBuf::from(c.as_os_str())));
                }
            }
        }
    }
    Some(at.iter().collect())
}
