//! A reader for Erlang terms in text form, as found in release files
//! (`NAME.rel`, `relup`, `RELEASES`, `sys.config`).
//!
//! beamup reads these files from tarballs it has not yet trusted, so the
//! parser is strict and bounded: nesting depth and input size are limited,
//! and anything outside the subset OTP writes into those files (atoms,
//! strings, numbers, tuples, lists, binaries of strings, char literals) is an
//! error rather than a guess.

use std::fmt;

use crate::limits::LIMITS;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Term {
    Atom(String),
    /// A double-quoted string (in Erlang, a list of character codes).
    Str(String),
    Int(i128),
    Float(f64),
    Tuple(Vec<Term>),
    List(Vec<Term>),
    Binary(Vec<u8>),
}

impl Term {
    pub(crate) fn as_atom(&self) -> Option<&str> {
        match self {
            Term::Atom(a) => Some(a),
            _ => None,
        }
    }

    /// A string, accepting `""` written as `[]`.
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Term::Str(s) => Some(s),
            Term::List(l) if l.is_empty() => Some(""),
            _ => None,
        }
    }

    pub(crate) fn as_tuple(&self) -> Option<&[Term]> {
        match self {
            Term::Tuple(t) => Some(t),
            _ => None,
        }
    }

    pub(crate) fn as_list(&self) -> Option<&[Term]> {
        match self {
            Term::List(l) => Some(l),
            Term::Str(s) if s.is_empty() => Some(&[]),
            _ => None,
        }
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn seq(f: &mut fmt::Formatter<'_>, items: &[Term]) -> fmt::Result {
            for (i, t) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{t}")?;
            }
            Ok(())
        }
        match self {
            Term::Atom(a) => write!(f, "{a}"),
            Term::Str(s) => write!(f, "{s:?}"),
            Term::Int(i) => write!(f, "{i}"),
            Term::Float(x) => write!(f, "{x}"),
            Term::Tuple(t) => {
                f.write_str("{")?;
                seq(f, t)?;
                f.write_str("}")
            }
            Term::List(l) => {
                f.write_str("[")?;
                seq(f, l)?;
                f.write_str("]")
            }
            Term::Binary(b) => write!(f, "<<{:?}>>", String::from_utf8_lossy(b)),
        }
    }
}

/// Parses a file of dot-terminated terms (as `file:consult/1` reads).
pub(crate) fn parse_terms(text: &str) -> Result<Vec<Term>, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        p.skip_ws();
        if p.i >= p.s.len() {
            return Ok(out);
        }
        out.push(p.term(0)?);
        p.skip_ws();
        p.expect(b'.')?;
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> String {
        let line = 1 + self.s[..self.i.min(self.s.len())]
            .iter()
            .filter(|&&c| c == b'\n')
            .count();
        format!("line {line}: {what}")
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(c) = self.peek() {
            if c.is_ascii_whitespace() {
                self.i += 1;
            } else if c == b'%' {
                while let Some(c) = self.peek() {
                    self.i += 1;
                    if c == b'\n' {
                        break;
                    }
                }
            } else {
                break;
            }
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected '{}'", c as char)))
        }
    }

    fn term(&mut self, depth: usize) -> Result<Term, String> {
        if depth > LIMITS.text_term_depth {
            return Err(self.err("terms nested too deeply"));
        }
        self.skip_ws();
        match self.peek() {
            None => Err(self.err("unexpected end of input")),
            Some(b'{') => {
                self.i += 1;
                Ok(Term::Tuple(self.seq(b'}', depth)?))
            }
            Some(b'[') => {
                self.i += 1;
                Ok(Term::List(self.seq(b']', depth)?))
            }
            Some(b'"') => Ok(Term::Str(self.quoted(b'"')?)),
            Some(b'\'') => Ok(Term::Atom(self.quoted(b'\'')?)),
            Some(b'<') => self.binary(),
            Some(b'$') => {
                self.i += 1;
                let c = self.char_in_quoted()?;
                Ok(Term::Int(c as i128))
            }
            Some(c) if c.is_ascii_digit() || c == b'-' => self.number(),
            Some(c) if c.is_ascii_lowercase() => {
                let start = self.i;
                while let Some(c) = self.peek() {
                    if c.is_ascii_alphanumeric() || c == b'_' || c == b'@' {
                        self.i += 1;
                    } else {
                        break;
                    }
                }
                Ok(Term::Atom(
                    String::from_utf8_lossy(&self.s[start..self.i]).into(),
                ))
            }
            Some(c) => Err(self.err(&format!("unexpected character '{}'", c as char))),
        }
    }

    fn seq(&mut self, close: u8, depth: usize) -> Result<Vec<Term>, String> {
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(close) {
            self.i += 1;
            return Ok(items);
        }
        loop {
            items.push(self.term(depth + 1)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(c) if c == close => {
                    self.i += 1;
                    return Ok(items);
                }
                _ => return Err(self.err(&format!("expected ',' or '{}'", close as char))),
            }
        }
    }

    fn quoted(&mut self, q: u8) -> Result<String, String> {
        self.i += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated string")),
                Some(c) if c == q => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(_) => out.push(self.char_in_quoted()?),
            }
        }
    }

    fn char_in_quoted(&mut self) -> Result<char, String> {
        let rest = std::str::from_utf8(&self.s[self.i..])
            .or_else(|e| std::str::from_utf8(&self.s[self.i..self.i + e.valid_up_to()]))
            .map_err(|_| self.err("invalid UTF-8"))?;
        let mut chars = rest.chars();
        let c = chars
            .next()
            .ok_or_else(|| self.err("unexpected end of input"))?;
        self.i += c.len_utf8();
        if c != '\\' {
            return Ok(c);
        }
        let e = chars
            .next()
            .ok_or_else(|| self.err("unterminated escape"))?;
        self.i += e.len_utf8();
        Ok(match e {
            'n' => '\n',
            't' => '\t',
            'r' => '\r',
            's' => ' ',
            'e' => '\x1b',
            '0'..='7' => {
                let mut v = e.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    match self.peek() {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            self.i += 1;
                        }
                        _ => break,
                    }
                }
                char::from_u32(v).ok_or_else(|| self.err("bad octal escape"))?
            }
            other => other,
        })
    }

    fn binary(&mut self) -> Result<Term, String> {
        if !self.s[self.i..].starts_with(b"<<") {
            return Err(self.err("unexpected '<'"));
        }
        self.i += 2;
        self.skip_ws();
        let mut bytes = Vec::new();
        if self.peek() == Some(b'"') {
            bytes = self.quoted(b'"')?.into_bytes();
        }
        self.skip_ws();
        if !self.s[self.i..].starts_with(b">>") {
            return Err(self.err("only <<\"text\">> binaries are supported"));
        }
        self.i += 2;
        Ok(Term::Binary(bytes))
    }

    fn number(&mut self) -> Result<Term, String> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let mut float = false;
        while let Some(c) = self.peek() {
            let part_of_float =
                c == b'.' && self.s.get(self.i + 1).is_some_and(|d| d.is_ascii_digit());
            if c.is_ascii_digit() || c == b'_' {
                self.i += 1;
            } else if part_of_float || (float && matches!(c, b'e' | b'E' | b'+' | b'-')) {
                float = true;
                self.i += 1;
            } else {
                break;
            }
        }
        let text: String = String::from_utf8_lossy(&self.s[start..self.i]).replace('_', "");
        let parsed = if float {
            text.parse().ok().map(Term::Float)
        } else {
            text.parse().ok().map(Term::Int)
        };
        parsed.ok_or_else(|| self.err(&format!("bad number {text:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_rel_file() {
        let text = r#"%% rel file
{release,{"thermo","1.1.0"},
         {erts,"13.1.5"},
         [{kernel,"8.5.3"},{stdlib,"4.2"},{sasl,"4.2"},{thermo,"1.1.0"}]}.
"#;
        let terms = parse_terms(text).unwrap();
        assert_eq!(terms.len(), 1);
        let t = terms[0].as_tuple().unwrap();
        assert_eq!(t[0].as_atom(), Some("release"));
        assert_eq!(t[1].as_tuple().unwrap()[1].as_str(), Some("1.1.0"));
        assert_eq!(t[3].as_list().unwrap().len(), 4);
    }

    #[test]
    fn parses_relup_shapes() {
        let text = r#"{"1.1.0",
 [{"1.0.0",[],
   [{load_object_code,{thermo,"1.1.0",[thermo_state]}},
    point_of_no_return,
    {suspend,[thermo_state]},
    {load,{thermo_state,brutal_purge,brutal_purge}},
    {code_change,up,[{thermo_state,[]}]},
    {resume,[thermo_state]}]}],
 [{"1.0.0",[],[point_of_no_return]}]}."#;
        let terms = parse_terms(text).unwrap();
        let t = terms[0].as_tuple().unwrap();
        assert_eq!(t[0].as_str(), Some("1.1.0"));
        let up = t[1].as_list().unwrap();
        assert_eq!(up[0].as_tuple().unwrap()[0].as_str(), Some("1.0.0"));
    }

    #[test]
    fn escapes_numbers_and_quoted_atoms() {
        let t = parse_terms(r#"{'it''s', "a\"b\n", -12, 1.5e3, $a, <<"bin">>}."#);
        // A quoted atom with an embedded quote is written with a backslash in
        // Erlang; the doubled quote above is two atoms' worth of error.
        assert!(t.is_err());
        let t = parse_terms(r#"{'it\'s', "a\"b\n", -12, 1.5e3, $a, <<"bin">>}."#).unwrap();
        assert_eq!(
            t[0],
            Term::Tuple(vec![
                Term::Atom("it's".into()),
                Term::Str("a\"b\n".into()),
                Term::Int(-12),
                Term::Float(1500.0),
                Term::Int(97),
                Term::Binary(b"bin".to_vec()),
            ])
        );
    }

    #[test]
    fn hostile_input_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        assert!(parse_terms(&deep).unwrap_err().contains("nested"));
        assert!(parse_terms("{\"unterminated").is_err());
        assert!(parse_terms("{a,b}").is_err()); // no final dot
        assert!(parse_terms("#{a => 1}.").is_err());
    }
}
