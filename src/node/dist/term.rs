//! Erlang External Term Format: the subset a hidden node meets, as a small
//! owned tree.
//!
//! Written here instead of using the `eetf` crate because its decoder sizes
//! allocations straight from length fields (`Vec::with_capacity(count)` on a
//! 32-bit count) and recurses without a depth limit: a single hostile frame
//! could abort the agent. This decoder caps every allocation by the bytes
//! actually present, caps nesting depth (`LIMITS.node_term_depth`) and
//! the memory a decoded term takes (`LIMITS.node_term_bytes`), so the worst
//! case is bounded whatever the frame holds.

use std::fmt;

use crate::limits::LIMITS;

/// External term format version byte that starts every encoded term.
pub(crate) const VERSION: u8 = 131;
/// Items reserved up front for a tuple, list or map; the rest as they
/// decode. A length field is only checked against the bytes left, and
/// each item takes one byte there but 40 in memory: reserved in full at
/// every level of nesting, one frame of n bytes could ask for
/// 40 * n * `LIMITS.node_term_depth` (a 1 MiB frame, 10 GiB).
const PREALLOC_ITEMS: usize = 64;

/// An Erlang process identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pid {
    pub(crate) node: String,
    pub(crate) id: u32,
    pub(crate) serial: u32,
    pub(crate) creation: u32,
}

/// An Erlang port identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Port {
    pub(crate) node: String,
    pub(crate) id: u64,
    pub(crate) creation: u32,
}

/// An Erlang reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    pub(crate) node: String,
    pub(crate) creation: u32,
    pub(crate) ids: Vec<u32>,
}

/// A fun received from the node. We never build funs; the raw encoding is
/// kept so the term can still be echoed back unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Fun {
    /// Module the fun belongs to.
    pub(crate) module: String,
    /// `Some((function, arity))` for `fun M:F/A`, `None` for a closure.
    pub(crate) export: Option<(String, u8)>,
    /// Complete encoding including the tag byte.
    raw: Vec<u8>,
}

/// An Erlang term. Strings arrive as lists of integers (that is what they are
/// in Erlang); see `Term::as_charlist` and `Term::charlist`.
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    Atom(String),
    Int(i64),
    /// Integer outside i64: sign and little-endian magnitude bytes.
    BigInt {
        negative: bool,
        magnitude: Vec<u8>,
    },
    Float(f64),
    Binary(Vec<u8>),
    /// Bitstring whose last byte holds `bits` (1..=8) significant bits.
    BitBinary {
        bytes: Vec<u8>,
        bits: u8,
    },
    /// Proper list; `[]` is `List(vec![])`.
    List(Vec<Term>),
    ImproperList(Vec<Term>, Box<Term>),
    Tuple(Vec<Term>),
    Map(Vec<(Term, Term)>),
    Pid(Box<Pid>),
    Port(Box<Port>),
    Ref(Box<Reference>),
    Fun(Box<Fun>),
}

impl Term {
    pub fn atom(name: &str) -> Term {
        Term::Atom(name.to_owned())
    }

    /// An Erlang string (list of code points), as file names and versions
    /// are passed to release_handler.
    pub(crate) fn charlist(s: &str) -> Term {
        Term::List(
            s.chars()
                .map(|c| Term::Int(i64::from(u32::from(c))))
                .collect(),
        )
    }

    pub(crate) fn tuple(items: Vec<Term>) -> Term {
        Term::Tuple(items)
    }

    pub fn nil() -> Term {
        Term::List(Vec::new())
    }

    pub(crate) fn as_atom(&self) -> Option<&str> {
        match self {
            Term::Atom(a) => Some(a),
            _ => None,
        }
    }

    pub fn is_atom(&self, name: &str) -> bool {
        self.as_atom() == Some(name)
    }

    pub fn as_tuple(&self) -> Option<&[Term]> {
        match self {
            Term::Tuple(t) => Some(t),
            _ => None,
        }
    }

    pub(crate) fn as_list(&self) -> Option<&[Term]> {
        match self {
            Term::List(l) => Some(l),
            _ => None,
        }
    }

    pub(crate) fn as_int(&self) -> Option<i64> {
        match self {
            Term::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The text of an Erlang string (a proper list of Unicode code points).
    pub(crate) fn as_charlist(&self) -> Option<String> {
        self.as_list()?
            .iter()
            .map(|t| {
                t.as_int()
                    .and_then(|i| u32::try_from(i).ok())
                    .and_then(char::from_u32)
            })
            .collect()
    }

    /// Encodes with the leading version byte, as `term_to_binary/1` does.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoding without the version byte.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Term::Atom(a) => encode_atom(a, out),
            Term::Int(i) => {
                if (0..=255).contains(i) {
                    out.extend([97, *i as u8]);
                } else if let Ok(small) = i32::try_from(*i) {
                    out.push(98);
                    out.extend(small.to_be_bytes());
                } else {
                    let mag = i.unsigned_abs().to_le_bytes();
                    let len = mag.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
                    out.extend([110, len as u8, u8::from(*i < 0)]);
                    out.extend(&mag[..len]);
                }
            }
            Term::BigInt {
                negative,
                magnitude,
            } => {
                if let Ok(n) = u8::try_from(magnitude.len()) {
                    out.extend([110, n]);
                } else {
                    out.push(111);
                    out.extend(len32(magnitude.len()));
                }
                out.push(u8::from(*negative));
                out.extend(magnitude);
            }
            Term::Float(f) => {
                out.push(70);
                out.extend(f.to_be_bytes());
            }
            Term::Binary(b) => {
                out.push(109);
                out.extend(len32(b.len()));
                out.extend(b);
            }
            Term::BitBinary { bytes, bits } => {
                out.push(77);
                out.extend(len32(bytes.len()));
                out.push(*bits);
                out.extend(bytes);
            }
            Term::List(items) if items.is_empty() => out.push(106),
            Term::List(items) => {
                let bytes: Option<Vec<u8>> = items
                    .iter()
                    .map(|t| t.as_int().and_then(|i| u8::try_from(i).ok()))
                    .collect();
                match bytes {
                    Some(b) if b.len() <= usize::from(u16::MAX) => {
                        out.push(107);
                        out.extend((b.len() as u16).to_be_bytes());
                        out.extend(b);
                    }
                    _ => {
                        out.push(108);
                        out.extend(len32(items.len()));
                        items.iter().for_each(|t| t.encode_into(out));
                        out.push(106);
                    }
                }
            }
            Term::ImproperList(items, tail) => {
                out.push(108);
                out.extend(len32(items.len()));
                items.iter().for_each(|t| t.encode_into(out));
                tail.encode_into(out);
            }
            Term::Tuple(items) => {
                if let Ok(n) = u8::try_from(items.len()) {
                    out.extend([104, n]);
                } else {
                    out.push(105);
                    out.extend(len32(items.len()));
                }
                items.iter().for_each(|t| t.encode_into(out));
            }
            Term::Map(pairs) => {
                out.push(116);
                out.extend(len32(pairs.len()));
                for (k, v) in pairs {
                    k.encode_into(out);
                    v.encode_into(out);
                }
            }
            Term::Pid(p) => {
                out.push(88);
                encode_atom(&p.node, out);
                out.extend(p.id.to_be_bytes());
                out.extend(p.serial.to_be_bytes());
                out.extend(p.creation.to_be_bytes());
            }
            Term::Port(p) => {
                out.push(120);
                encode_atom(&p.node, out);
                out.extend(p.id.to_be_bytes());
                out.extend(p.creation.to_be_bytes());
            }
            Term::Ref(r) => {
                out.push(90);
                out.extend((r.ids.len() as u16).to_be_bytes());
                encode_atom(&r.node, out);
                out.extend(r.creation.to_be_bytes());
                r.ids.iter().for_each(|id| out.extend(id.to_be_bytes()));
            }
            Term::Fun(f) => out.extend(&f.raw),
        }
    }

    /// Decodes one term that starts with the version byte and must fill
    /// `bytes` exactly.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn decode(bytes: &[u8]) -> Result<Term, DecodeError> {
        let mut d = Decoder::new(bytes);
        let term = d.versioned()?;
        if d.pos != bytes.len() {
            return Err(d.err("trailing bytes after term"));
        }
        Ok(term)
    }

    /// Renders the term as Erlang source text, cut to about `max` chars so
    /// a huge crash reason cannot flood a log line.
    pub(crate) fn to_text_limited(&self, max: usize) -> String {
        let mut s = self.to_string();
        if s.len() > max {
            let mut cut = max;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.push_str("...");
        }
        s
    }
}

fn len32(n: usize) -> [u8; 4] {
    u32::try_from(n)
        .expect("term too large to encode")
        .to_be_bytes()
}

fn encode_atom(name: &str, out: &mut Vec<u8>) {
    match u8::try_from(name.len()) {
        Ok(n) => out.extend([119, n]),
        Err(_) => {
            out.push(118);
            out.extend(
                u16::try_from(name.len())
                    .expect("atom too long")
                    .to_be_bytes(),
            );
        }
    }
    out.extend(name.as_bytes());
}

/// A term that could not be decoded: what was wrong and at which offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed external term at byte {offset}: {what}")]
pub struct DecodeError {
    pub(crate) offset: usize,
    pub(crate) what: String,
}

/// Cursor over untrusted bytes. Every length is checked against the bytes
/// left before anything is allocated.
pub(crate) struct Decoder<'a> {
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
    /// Bytes of term nodes decoded so far (`LIMITS.node_term_bytes`).
    held: usize,
}

impl<'a> Decoder<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Decoder {
            bytes,
            pos: 0,
            depth: 0,
            held: 0,
        }
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn err(&self, what: impl Into<String>) -> DecodeError {
        DecodeError {
            offset: self.pos,
            what: what.into(),
        }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(self.err(format!("needs {n} bytes, {} left", self.remaining())));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }

    /// A length field for `per_item`-byte items, refused when the bytes
    /// left cannot hold that many: this is what keeps allocation bounded.
    fn count(&mut self, n: usize, per_item: usize) -> Result<usize, DecodeError> {
        if n.saturating_mul(per_item) > self.remaining() {
            return Err(self.err(format!(
                "length field says {n} items, only {} bytes left",
                self.remaining()
            )));
        }
        Ok(n)
    }

    /// A term preceded by the version byte 131.
    pub(crate) fn versioned(&mut self) -> Result<Term, DecodeError> {
        match self.u8()? {
            VERSION => self.term(),
            v => Err(self.err(format!("version byte {v}, expected {VERSION}"))),
        }
    }

    /// Counts `nodes` more term nodes against `LIMITS.node_term_bytes`.
    fn hold(&mut self, nodes: usize) -> Result<(), DecodeError> {
        self.held = self
            .held
            .saturating_add(nodes.saturating_mul(std::mem::size_of::<Term>()));
        if self.held > LIMITS.node_term_bytes {
            return Err(self.err(format!(
                "the term decodes to more than {} MiB in memory; refused",
                LIMITS.node_term_bytes >> 20
            )));
        }
        Ok(())
    }

    pub(crate) fn term(&mut self) -> Result<Term, DecodeError> {
        self.hold(1)?;
        if self.depth >= LIMITS.node_term_depth {
            return Err(self.err(format!("nested deeper than {}", LIMITS.node_term_depth)));
        }
        self.depth += 1;
        let t = self.term_inner();
        self.depth -= 1;
        t
    }

    fn items(&mut self, n: usize) -> Result<Vec<Term>, DecodeError> {
        let n = self.count(n, 1)?;
        let mut v = Vec::with_capacity(n.min(PREALLOC_ITEMS));
        for _ in 0..n {
            v.push(self.term()?);
        }
        Ok(v)
    }

    fn atom(&mut self) -> Result<String, DecodeError> {
        let start = self.pos;
        match self.term()? {
            Term::Atom(a) => Ok(a),
            _ => Err(DecodeError {
                offset: start,
                what: "expected an atom (node name)".into(),
            }),
        }
    }

    fn atom_text(&mut self, len: usize, utf8: bool) -> Result<Term, DecodeError> {
        let raw = self.take(len)?;
        if utf8 {
            std::str::from_utf8(raw)
                .map(|s| Term::Atom(s.to_owned()))
                .map_err(|_| self.err("atom is not valid UTF-8"))
        } else {
            Ok(Term::Atom(raw.iter().map(|&b| char::from(b)).collect()))
        }
    }

    fn big(&mut self, n: usize) -> Result<Term, DecodeError> {
        let n = self.count(n, 1)?;
        let negative = self.u8()? != 0;
        let magnitude = self.take(n)?;
        let len = magnitude.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        if len <= 8 {
            let mut buf = [0u8; 8];
            buf[..len].copy_from_slice(&magnitude[..len]);
            let m = u64::from_le_bytes(buf);
            let v = if negative {
                0i64.checked_sub_unsigned(m)
            } else {
                i64::try_from(m).ok()
            };
            if let Some(v) = v {
                return Ok(Term::Int(v));
            }
        }
        Ok(Term::BigInt {
            negative,
            magnitude: magnitude[..len].to_vec(),
        })
    }

    /// Containers only: this is the recursive path, kept small so a deep
    /// term costs little stack per level (debug builds included).
    fn term_inner(&mut self) -> Result<Term, DecodeError> {
        let tag_pos = self.pos;
        let tag = self.u8()?;
        match tag {
            104 => {
                let n = self.u8()?;
                Ok(Term::Tuple(self.items(usize::from(n))?))
            }
            105 => {
                let n = self.u32()?;
                Ok(Term::Tuple(self.items(n as usize)?))
            }
            108 => {
                let n = self.u32()?;
                let items = self.items(n as usize)?;
                match self.term()? {
                    Term::List(t) if t.is_empty() => Ok(Term::List(items)),
                    tail => Ok(Term::ImproperList(items, Box::new(tail))),
                }
            }
            116 => self.map(),
            _ => self.scalar(tag, tag_pos),
        }
    }

    #[inline(never)]
    fn map(&mut self) -> Result<Term, DecodeError> {
        let n = self.u32()?;
        let n = self.count(n as usize, 2)?;
        let mut pairs = Vec::with_capacity(n.min(PREALLOC_ITEMS));
        for _ in 0..n {
            let k = self.term()?;
            let v = self.term()?;
            pairs.push((k, v));
        }
        Ok(Term::Map(pairs))
    }

    /// Everything without nested terms (node-name atoms aside).
    #[inline(never)]
    fn scalar(&mut self, tag: u8, tag_pos: usize) -> Result<Term, DecodeError> {
        Ok(match tag {
            97 => Term::Int(i64::from(self.u8()?)),
            98 => Term::Int(i64::from(self.u32()? as i32)),
            110 => {
                let n = self.u8()?;
                self.big(usize::from(n))?
            }
            111 => {
                let n = self.u32()?;
                self.big(n as usize)?
            }
            70 => Term::Float(f64::from_be_bytes(self.take(8)?.try_into().unwrap())),
            99 => {
                let raw = self.take(31)?;
                let text = String::from_utf8_lossy(raw);
                let f = text
                    .trim_end_matches('\0')
                    .trim()
                    .parse()
                    .map_err(|_| self.err("bad FLOAT_EXT text"))?;
                Term::Float(f)
            }
            100 | 118 => {
                let n = self.u16()?;
                self.atom_text(usize::from(n), tag == 118)?
            }
            115 | 119 => {
                let n = self.u8()?;
                self.atom_text(usize::from(n), tag == 119)?
            }
            106 => Term::nil(),
            107 => {
                let n = self.u16()?;
                let raw = self.take(usize::from(n))?;
                self.hold(raw.len())?;
                Term::List(raw.iter().map(|&b| Term::Int(i64::from(b))).collect())
            }
            109 => {
                let n = self.u32()?;
                Term::Binary(self.take(n as usize)?.to_vec())
            }
            77 => {
                let n = self.u32()?;
                let bits = self.u8()?;
                if !(1..=8).contains(&bits) {
                    return Err(self.err(format!("bit binary with {bits} bits in last byte")));
                }
                Term::BitBinary {
                    bytes: self.take(n as usize)?.to_vec(),
                    bits,
                }
            }
            103 | 88 => {
                let node = self.atom()?;
                let id = self.u32()?;
                let serial = self.u32()?;
                let creation = if tag == 103 {
                    u32::from(self.u8()?)
                } else {
                    self.u32()?
                };
                Term::Pid(Box::new(Pid {
                    node,
                    id,
                    serial,
                    creation,
                }))
            }
            102 | 89 | 120 => {
                let node = self.atom()?;
                let id = if tag == 120 {
                    self.u64()?
                } else {
                    u64::from(self.u32()?)
                };
                let creation = if tag == 102 {
                    u32::from(self.u8()?)
                } else {
                    self.u32()?
                };
                Term::Port(Box::new(Port { node, id, creation }))
            }
            101 => {
                let node = self.atom()?;
                let id = self.u32()?;
                let creation = u32::from(self.u8()?);
                Term::Ref(Box::new(Reference {
                    node,
                    creation,
                    ids: vec![id],
                }))
            }
            114 | 90 => {
                let n = self.u16()?;
                let node = self.atom()?;
                let creation = if tag == 114 {
                    u32::from(self.u8()?)
                } else {
                    self.u32()?
                };
                let n = self.count(usize::from(n), 4)?;
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push(self.u32()?);
                }
                Term::Ref(Box::new(Reference {
                    node,
                    creation,
                    ids,
                }))
            }
            113 => {
                let module = self.atom()?;
                let function = self.atom()?;
                let arity = match self.term()? {
                    Term::Int(a) => u8::try_from(a).map_err(|_| self.err("bad fun arity"))?,
                    _ => return Err(self.err("bad fun arity")),
                };
                Term::Fun(Box::new(Fun {
                    module,
                    export: Some((function, arity)),
                    raw: self.bytes[tag_pos..self.pos].to_vec(),
                }))
            }
            112 => {
                // Size counts itself; skip the body by it after reading the
                // module (arity 1, uniq 16, index 4, numfree 4 precede it).
                let size = self.u32()? as usize;
                let body_start = self.pos;
                self.take(1 + 16 + 4 + 4)?;
                let module = self.atom()?;
                let end = (body_start - 4)
                    .checked_add(size)
                    .filter(|&e| e >= self.pos && e <= self.bytes.len())
                    .ok_or_else(|| self.err("bad NEW_FUN_EXT size"))?;
                self.pos = end;
                Term::Fun(Box::new(Fun {
                    module,
                    export: None,
                    raw: self.bytes[tag_pos..end].to_vec(),
                }))
            }
            80 => return Err(self.err("compressed terms are not accepted")),
            82 => return Err(self.err("atom cache reference without negotiated atom cache")),
            t => return Err(self.err(format!("unsupported term tag {t}"))),
        })
    }
}

/// Erlang-like text (the shape `io:format("~p")` would print), for logs and
/// error messages.
impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Term::Atom(a) => write_atom(f, a),
            Term::Int(i) => write!(f, "{i}"),
            Term::BigInt {
                negative,
                magnitude,
            } => {
                // Hex keeps this dependency-free; such values only show up
                // in error text.
                let sign = if *negative { "-" } else { "" };
                write!(f, "{sign}16#")?;
                if magnitude.is_empty() {
                    return write!(f, "0");
                }
                magnitude
                    .iter()
                    .rev()
                    .try_for_each(|b| write!(f, "{b:02X}"))
            }
            Term::Float(x) => write!(f, "{x:?}"),
            Term::Binary(b) => match std::str::from_utf8(b) {
                Ok(s) if s.chars().all(is_printable) => {
                    write!(f, "<<\"")?;
                    write_escaped(f, s)?;
                    write!(f, "\">>")
                }
                _ => {
                    write!(f, "<<")?;
                    write_seq(f, b.iter())?;
                    write!(f, ">>")
                }
            },
            Term::BitBinary { bytes, bits } => {
                write!(f, "<<")?;
                if let Some((last, rest)) = bytes.split_last() {
                    for b in rest {
                        write!(f, "{b},")?;
                    }
                    write!(f, "{}:{bits}", last >> (8 - bits))?;
                }
                write!(f, ">>")
            }
            Term::List(items) => match self.as_charlist() {
                Some(s) if !s.is_empty() && s.chars().all(is_printable) => {
                    write!(f, "\"")?;
                    write_escaped(f, &s)?;
                    write!(f, "\"")
                }
                _ => {
                    write!(f, "[")?;
                    write_seq(f, items.iter())?;
                    write!(f, "]")
                }
            },
            Term::ImproperList(items, tail) => {
                write!(f, "[")?;
                write_seq(f, items.iter())?;
                write!(f, "|{tail}]")
            }
            Term::Tuple(items) => {
                write!(f, "{{")?;
                write_seq(f, items.iter())?;
                write!(f, "}}")
            }
            Term::Map(pairs) => {
                write!(f, "#{{")?;
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        write!(f, ",")?;
                    }
                    write!(f, "{k} => {v}")?;
                }
                write!(f, "}}")
            }
            Term::Pid(p) => write!(f, "<{}.{}.{}>", p.node, p.id, p.serial),
            Term::Port(p) => write!(f, "#Port<{}.{}>", p.node, p.id),
            Term::Ref(r) => {
                write!(f, "#Ref<{}", r.node)?;
                r.ids.iter().rev().try_for_each(|i| write!(f, ".{i}"))?;
                write!(f, ">")
            }
            Term::Fun(fun) => match &fun.export {
                Some((name, arity)) => {
                    write!(f, "fun ")?;
                    write_atom(f, &fun.module)?;
                    write!(f, ":")?;
                    write_atom(f, name)?;
                    write!(f, "/{arity}")
                }
                None => write!(f, "#Fun<{}>", fun.module),
            },
        }
    }
}

fn write_seq<T: fmt::Display>(
    f: &mut fmt::Formatter<'_>,
    items: impl Iterator<Item = T>,
) -> fmt::Result {
    for (i, t) in items.enumerate() {
        if i > 0 {
            write!(f, ",")?;
        }
        write!(f, "{t}")?;
    }
    Ok(())
}

fn is_printable(c: char) -> bool {
    !c.is_control() || matches!(c, '\n' | '\t' | '\r')
}

fn write_escaped(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    for c in s.chars() {
        match c {
            '"' => write!(f, "\\\"")?,
            '\\' => write!(f, "\\\\")?,
            '\n' => write!(f, "\\n")?,
            '\t' => write!(f, "\\t")?,
            '\r' => write!(f, "\\r")?,
            c => write!(f, "{c}")?,
        }
    }
    Ok(())
}

fn write_atom(f: &mut fmt::Formatter<'_>, a: &str) -> fmt::Result {
    let bare = a.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && a.chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '@');
    if bare {
        write!(f, "{a}")
    } else {
        write!(f, "'")?;
        for c in a.chars() {
            match c {
                '\'' => write!(f, "\\'")?,
                '\\' => write!(f, "\\\\")?,
                c => write!(f, "{c}")?,
            }
        }
        write!(f, "'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list of `strings` `STRING_EXT`s of `len` bytes each.
    fn list_of_strings(strings: usize, len: u16) -> Vec<u8> {
        let mut b = vec![VERSION, 108];
        b.extend((strings as u32).to_be_bytes());
        for _ in 0..strings {
            b.push(107);
            b.extend(len.to_be_bytes());
            b.extend(std::iter::repeat_n(b'a', usize::from(len)));
        }
        b.push(106);
        b
    }

    #[test]
    fn a_term_that_decodes_to_more_than_the_limit_is_refused() {
        // 1 MiB on the wire, 40 MiB as term nodes.
        let big = list_of_strings(16, 65_000);
        let e = Term::decode(&big).unwrap_err();
        assert!(e.what.contains("decodes to more than 8 MiB"), "{e}");
        // A big which_releases reply (a thousand 25-byte strings) is far
        // below it.
        let releases = list_of_strings(1000, 25);
        assert!(matches!(Term::decode(&releases), Ok(Term::List(l)) if l.len() == 1000));
        // Nodes count as well as strings: 300,000 small integers.
        let mut ints = vec![VERSION, 108];
        ints.extend(300_000u32.to_be_bytes());
        for _ in 0..300_000 {
            ints.extend([97, 1]);
        }
        ints.push(106);
        assert!(Term::decode(&ints).is_err());
        ints.truncate(2 + 4 + 2 * 100_000);
        ints[2..6].copy_from_slice(&100_000u32.to_be_bytes());
        ints.push(106);
        assert!(Term::decode(&ints).is_ok());
    }

    fn roundtrip(t: Term) {
        let bytes = t.encode();
        assert_eq!(Term::decode(&bytes).unwrap(), t, "bytes {bytes:?}");
    }

    #[test]
    fn roundtrips() {
        roundtrip(Term::atom("ok"));
        roundtrip(Term::atom(&"x".repeat(300)));
        for i in [
            0,
            255,
            256,
            -1,
            i32::MIN as i64,
            i32::MAX as i64 + 1,
            i64::MIN,
            i64::MAX,
        ] {
            roundtrip(Term::Int(i));
        }
        roundtrip(Term::Float(1.5));
        roundtrip(Term::Binary(b"abc".to_vec()));
        roundtrip(Term::charlist("héllo"));
        roundtrip(Term::charlist("λx"));
        roundtrip(Term::tuple(vec![
            Term::atom("a"),
            Term::nil(),
            Term::Int(-7),
        ]));
        roundtrip(Term::ImproperList(
            vec![Term::Int(1)],
            Box::new(Term::atom("t")),
        ));
        roundtrip(Term::Map(vec![(Term::atom("k"), Term::Int(1))]));
        roundtrip(Term::Pid(Box::new(Pid {
            node: "a@b".into(),
            id: 1,
            serial: 2,
            creation: 3,
        })));
        roundtrip(Term::Ref(Box::new(Reference {
            node: "a@b".into(),
            creation: 9,
            ids: vec![1, 2, 3],
        })));
    }

    #[test]
    fn decodes_bytes_from_erlang() {
        // term_to_binary({ok, "ab", <<1>>, 300, -5, 1 bsl 70})
        let bytes = [
            131, 104, 6, 100, 0, 2, 111, 107, 107, 0, 2, 97, 98, 109, 0, 0, 0, 1, 1, 98, 0, 0, 1,
            44, 98, 255, 255, 255, 251, 110, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 64,
        ];
        let t = Term::decode(&bytes).unwrap();
        assert_eq!(
            t.to_string(),
            "{ok,\"ab\",<<1>>,300,-5,16#400000000000000000}"
        );
    }

    #[test]
    fn small_big_fitting_i64_becomes_int() {
        let t = Term::decode(&[131, 110, 8, 1, 0, 0, 0, 0, 0, 0, 0, 128]).unwrap();
        assert_eq!(t, Term::Int(i64::MIN));
    }

    #[test]
    fn hostile_lengths_are_refused_without_allocating() {
        // LIST_EXT claiming 4 billion elements in an 8-byte input.
        let e = Term::decode(&[131, 108, 255, 255, 255, 255, 106, 106]).unwrap_err();
        assert!(e.what.contains("length field"), "{e}");
        // BINARY_EXT claiming 4 GiB.
        assert!(Term::decode(&[131, 109, 255, 255, 255, 255]).is_err());
        // MAP_EXT with huge count.
        assert!(Term::decode(&[131, 116, 128, 0, 0, 0]).is_err());
        // NEWER_REFERENCE_EXT with 65535 ids.
        assert!(Term::decode(&[131, 90, 255, 255, 119, 1, b'a', 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut bytes = vec![131];
        for _ in 0..10_000 {
            bytes.extend([104, 1]);
        }
        bytes.push(106);
        let e = Term::decode(&bytes).unwrap_err();
        assert!(e.what.contains("nested"), "{e}");
    }

    #[test]
    fn deepest_accepted_term_fits_a_small_stack() {
        // Tokio worker threads have 2 MiB; half of it must do, even unoptimised.
        let h = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(|| {
                let mut bytes = vec![131];
                for _ in 0..LIMITS.node_term_depth - 1 {
                    bytes.extend([104, 1]);
                }
                bytes.push(106);
                let t = Term::decode(&bytes).unwrap();
                t.to_string().len()
            })
            .unwrap();
        assert_eq!(h.join().unwrap(), 2 * (LIMITS.node_term_depth - 1) + 2);
    }

    #[test]
    fn truncated_and_trailing_input_is_refused() {
        assert!(Term::decode(&[131, 104, 2, 97, 1]).is_err());
        assert!(Term::decode(&[131, 97, 1, 0]).is_err());
        assert!(Term::decode(&[130, 97, 1]).is_err());
        assert!(Term::decode(&[]).is_err());
    }

    #[test]
    fn renders_like_erlang() {
        let t = Term::tuple(vec![
            Term::atom("badrpc"),
            Term::tuple(vec![
                Term::atom("EXIT"),
                Term::List(vec![
                    Term::atom("undef"),
                    Term::Int(1),
                    Term::charlist("a\"b"),
                ]),
            ]),
            Term::Binary(vec![0, 1]),
            Term::Map(vec![(Term::atom("a b"), Term::Float(2.0))]),
        ]);
        assert_eq!(
            t.to_string(),
            "{badrpc,{'EXIT',[undef,1,\"a\\\"b\"]},<<0,1>>,#{'a b' => 2.0}}"
        );
        assert_eq!(Term::nil().to_string(), "[]");
        assert_eq!(Term::atom("").to_string(), "''");
        assert_eq!(Term::atom("a").to_text_limited(10), "a");
        assert_eq!(
            Term::charlist(&"x".repeat(50)).to_text_limited(5),
            "\"xxxx..."
        );
    }

    #[test]
    fn funs_keep_their_encoding() {
        // term_to_binary(fun lists:reverse/1)
        let bytes = [
            131, 113, 100, 0, 5, 108, 105, 115, 116, 115, 100, 0, 7, 114, 101, 118, 101, 114, 115,
            101, 97, 1,
        ];
        let t = Term::decode(&bytes).unwrap();
        assert_eq!(t.to_string(), "fun lists:reverse/1");
        assert_eq!(t.encode(), bytes);
        // term_to_binary(fun() -> ok end) from the shell: a closure with
        // free variables, skipped by its size field.
        let mut closure = vec![
            131, 112, 0, 0, 0, 143, 0, 6, 83, 97, 170, 70, 21, 144, 209, 189, 241, 235, 98, 209,
            166, 235, 8, 0, 0, 0, 43, 0, 0, 0, 1, 100, 0, 8, 101, 114, 108, 95, 101, 118, 97, 108,
            97, 43, 98, 0, 50, 155, 13, 88, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111,
            104, 111, 115, 116, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 104, 6, 97, 1, 106, 100, 0, 4,
            110, 111, 110, 101, 100, 0, 4, 110, 111, 110, 101, 116, 0, 0, 0, 0, 108, 0, 0, 0, 1,
            104, 5, 100, 0, 6, 99, 108, 97, 117, 115, 101, 97, 1, 106, 106, 108, 0, 0, 0, 1, 104,
            3, 100, 0, 4, 97, 116, 111, 109, 97, 1, 100, 0, 2, 111, 107, 106, 106,
        ];
        let t = Term::decode(&closure).unwrap();
        assert_eq!(t.to_string(), "#Fun<erl_eval>");
        assert_eq!(t.encode(), closure);
        // A size field pointing past the end is refused.
        closure[5] = 200;
        assert!(Term::decode(&closure).is_err());
    }
}
