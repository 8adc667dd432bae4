//! Writing an indexed release tarball: the same tar stream, recompressed as
//! one gzip member per top-level unit (see [`crate::release::manifest::Part`]).
//!
//! An upgrade usually adds one or two applications and a `releases/VSN/`
//! directory to a release whose ERTS, `kernel` and `stdlib` the device
//! already has. With one gzip stream the device must inflate all of it to
//! reach the few files it writes; with the index it reads, hashes and
//! inflates only the parts it creates. The concatenation of the members is
//! still a valid `.tar.gz` (gzip allows several members), so `tar -xzf`
//! and OTP's own tools read it as before.
//!
//! The tar bytes are copied as they are, header blocks included: the
//! repacked stream inflates to the original archive up to its end blocks.
//! Entry names are checked on the way (`tarrules`, as the device does);
//! `bundle::create` checks every rule before this runs.

use std::io::{self, Read, Write};

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

use crate::error::{Error, Result};
use crate::limits::LIMITS;
use crate::release::manifest::Part;
use crate::release::tarrules;

const BLOCK: usize = 512;

/// Recompresses the gzip tar stream `input` into `out` as one gzip member
/// per unit and returns the index. Errors name the entry at fault; `what`
/// names the input in them.
pub fn index(input: impl Read, out: impl Write, what: &str) -> Result<Vec<Part>> {
    let bad = |detail: String| Error::InvalidRelease {
        path: what.into(),
        detail,
    };
    let stream = |e: io::Error| bad(format!("reading the compressed tar stream: {e}"));
    let mut input = io::BufReader::with_capacity(1 << 20, MultiGzDecoder::new(input));
    let mut out = Counting {
        inner: io::BufWriter::with_capacity(1 << 20, out),
        written: 0,
    };
    let mut parts: Vec<Part> = Vec::new();
    let mut member: Option<(String, u64, GzEncoder<Vec<u8>>)> = None;
    // Extension headers (long names, pax) travel with the entry they
    // describe, so they wait for it.
    let mut pending: Vec<u8> = Vec::new();
    let mut long_name: Option<Vec<u8>> = None;
    let mut header = [0u8; BLOCK];
    loop {
        if !read_block(&mut input, &mut header).map_err(stream)? {
            return Err(bad("the tar stream ends without its end blocks".into()));
        }
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let h = tar::Header::from_byte_slice(&header);
        if h.cksum().ok() != Some(crate::bundle::header_checksum(&header)) {
            return Err(bad(format!(
                "a tar header at entry {} has a bad checksum",
                parts.len() + 1
            )));
        }
        let size = h
            .entry_size()
            .map_err(|e| bad(format!("an entry size is unreadable: {e}")))?;
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let mut data = Vec::new();
        let kind = h.entry_type();
        let is_extension = kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions();
        if is_extension {
            if size > LIMITS.tar_extension_bytes {
                return Err(bad(format!("an extension header of {size} bytes")));
            }
            (&mut input)
                .take(padded)
                .read_to_end(&mut data)
                .map_err(stream)?;
            if data.len() as u64 != padded {
                return Err(bad("the tar stream is truncated".into()));
            }
            let body = &data[..size as usize];
            if kind.is_gnu_longname() {
                long_name = Some(body.split(|&b| b == 0).next().unwrap_or_default().to_vec());
            } else if kind.is_pax_local_extensions()
                && let Some(path) = pax_path(body)
            {
                long_name = Some(path);
            }
            pending.extend_from_slice(&header);
            pending.extend_from_slice(&data);
            continue;
        }
        if kind.is_gnu_sparse() {
            return Err(bad("sparse files are not supported in a release".into()));
        }
        let name = long_name
            .take()
            .unwrap_or_else(|| h.path_bytes().into_owned());
        let rel = tarrules::safe_relative_path(&name).map_err(|detail| Error::UnsafeRelease {
            path: what.into(),
            detail,
        })?;
        let unit = rel
            .as_deref()
            .and_then(tarrules::top_of)
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|u| crate::release::manifest::is_unit_path(u))
            .unwrap_or_default();
        if member.as_ref().is_none_or(|(u, _, _)| *u != unit) {
            finish(&mut member, &mut out, &mut parts).map_err(stream)?;
            member = Some((
                unit,
                out.written,
                GzEncoder::new(Vec::new(), Compression::default()),
            ));
        }
        let (_, _, gz) = member.as_mut().expect("just set");
        gz.write_all(&pending).map_err(stream)?;
        pending.clear();
        gz.write_all(&header).map_err(stream)?;
        let copied = io::copy(&mut (&mut input).take(padded), gz).map_err(stream)?;
        if copied != padded {
            return Err(bad("the tar stream is truncated".into()));
        }
        // Flush the encoder into the file now and then: memory stays at
        // one buffer whatever the unit's size.
        if gz.get_ref().len() >= 1 << 20 {
            let buf = std::mem::take(gz.get_mut());
            out.write_all(&buf).map_err(stream)?;
        }
    }
    finish(&mut member, &mut out, &mut parts).map_err(stream)?;
    // The end blocks, in a part of their own that no device needs to read.
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&[0u8; 2 * BLOCK]).map_err(stream)?;
    let offset = out.written;
    out.write_all(&gz.finish().map_err(stream)?)
        .map_err(stream)?;
    parts.push(Part {
        unit: String::new(),
        offset,
        size: out.written - offset,
    });
    out.flush().map_err(stream)?;
    Ok(parts)
}

fn finish<W: Write>(
    member: &mut Option<(String, u64, GzEncoder<Vec<u8>>)>,
    out: &mut Counting<W>,
    parts: &mut Vec<Part>,
) -> io::Result<()> {
    if let Some((unit, offset, gz)) = member.take() {
        out.write_all(&gz.finish()?)?;
        parts.push(Part {
            unit,
            offset,
            size: out.written - offset,
        });
    }
    Ok(())
}

/// Reads one block; `false` at a clean end of the stream.
fn read_block(r: &mut impl Read, block: &mut [u8; BLOCK]) -> io::Result<bool> {
    let mut got = 0;
    while got < BLOCK {
        match r.read(&mut block[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The `path` record of a pax extended header, if any.
fn pax_path(body: &[u8]) -> Option<Vec<u8>> {
    let mut rest = body;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        if len <= space || len > rest.len() {
            return None;
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(path) = record.strip_prefix(b"path=") {
            return Some(path.to_vec());
        }
        rest = &rest[len..];
    }
    None
}

struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A release tarball of plain files, as rebar3 would make it (one gzip
/// stream): (the tar bytes, the gzipped tarball). For unit tests.
#[cfg(test)]
pub(crate) fn test_tarball(entries: &[(&str, &[u8])]) -> (Vec<u8>, Vec<u8>) {
    use flate2::Compression;
    use flate2::write::GzEncoder;
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).unwrap();
    }
    let raw = b.into_inner().unwrap();
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&raw).unwrap();
    (raw, gz.finish().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;

    use super::test_tarball as tarball;

    #[test]
    fn parts_tile_the_output_and_inflate_to_the_same_archive() {
        let long = format!("lib/app-1.0/priv/{}", "x".repeat(150));
        let (raw, gz) = tarball(&[
            ("releases/1.0/app.rel", b"rel"),
            ("lib/app-1.0/ebin/app.beam", &[7u8; 3000]),
            (&long, b"long name"),
            ("lib/kernel-8.5/ebin/k.beam", b"k"),
            ("bin/app", b"#!/bin/sh"),
        ]);
        let mut out = Vec::new();
        let parts = index(&gz[..], &mut out, "t").unwrap();
        let units: Vec<&str> = parts.iter().map(|p| p.unit.as_str()).collect();
        assert_eq!(
            units,
            [
                "releases/1.0",
                "lib/app-1.0",
                "lib/kernel-8.5",
                "bin/app",
                ""
            ]
        );
        let mut at = 0;
        for p in &parts {
            assert_eq!(p.offset, at);
            at += p.size;
        }
        assert_eq!(at, out.len() as u64);
        // The whole is an ordinary .tar.gz of the same archive...
        let mut all = Vec::new();
        MultiGzDecoder::new(&out[..]).read_to_end(&mut all).unwrap();
        assert_eq!(all[..], raw[..all.len()]);
        assert!(raw[all.len()..].iter().all(|&b| b == 0));
        // ... and one part alone holds whole entries of its unit only.
        let app = &parts[1];
        let member = &out[app.offset as usize..(app.offset + app.size) as usize];
        let mut one = Vec::new();
        GzDecoder::new(member).read_to_end(&mut one).unwrap();
        let mut ar = tar::Archive::new(&one[..]);
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["lib/app-1.0/ebin/app.beam", long.as_str()]);
    }

    #[test]
    fn unsafe_entries_are_not_signed() {
        for bad in ["../etc/passwd", "lib/a-1/../../../x"] {
            let mut raw = Vec::new();
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..bad.len()].copy_from_slice(bad.as_bytes());
            h.set_size(0);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            raw.extend_from_slice(h.as_bytes());
            raw.extend_from_slice(&[0; 1024]);
            let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
            gz.write_all(&raw).unwrap();
            let e = index(&gz.finish().unwrap()[..], io::sink(), "t").unwrap_err();
            assert!(e.to_string().contains("climbs out"), "{bad}: {e}");
        }
    }
}
