//! A tiny JSON writer over [`core::fmt::Write`], for the serial report lines
//! (`@hv {...}`, see `xtask/REPORT.md`). No allocation, no buffering.
//!
//! Structure comes from closures, so commas, colons and closing brackets
//! cannot be forgotten:
//!
//! ```
//! use hv_core::json;
//! let mut line = String::new();
//! json::report_line(&mut line, |o| {
//!     o.field("cpus").object(|o| {
//!         o.field("possible").u64(4)?;
//!         o.field("failed").array(|a| a.item().u64(3))
//!     })
//! })
//! .unwrap();
//! assert_eq!(line, "@hv {\"cpus\":{\"possible\":4,\"failed\":[3]}}\n");
//! ```
//!
//! Every [`Value`] must be used exactly once: a field or item whose value is
//! never written leaves invalid JSON (hence `#[must_use]`).

use core::fmt::{self, Display, Write};

/// The marker that starts a report line.
pub const REPORT_MARKER: &str = "@hv ";

/// Writes one report line: the marker, one object, a newline.
pub fn report_line<W, F>(out: &mut W, f: F) -> fmt::Result
where
    W: Write,
    F: FnOnce(&mut Object<'_, W>) -> fmt::Result,
{
    out.write_str(REPORT_MARKER)?;
    Value::new(out).object(f)?;
    out.write_char('\n')
}

/// A place for exactly one JSON value.
#[must_use = "a field or item needs its value written"]
#[derive(Debug)]
pub struct Value<'w, W: Write> {
    out: &'w mut W,
    /// The result of writing what precedes the value (key, comma): an
    /// error there is returned by the value's write.
    pending: fmt::Result,
}

impl<'w, W: Write> Value<'w, W> {
    /// A value written straight to `out` (e.g. a whole document).
    pub fn new(out: &'w mut W) -> Self {
        Self {
            out,
            pending: Ok(()),
        }
    }

    /// `null`.
    pub fn null(self) -> fmt::Result {
        self.pending?;
        self.out.write_str("null")
    }

    /// `true` or `false`.
    pub fn bool(self, value: bool) -> fmt::Result {
        self.pending?;
        self.out.write_str(if value { "true" } else { "false" })
    }

    /// An unsigned integer.
    pub fn u64(self, value: u64) -> fmt::Result {
        self.pending?;
        write!(self.out, "{value}")
    }

    /// A signed integer.
    pub fn i64(self, value: i64) -> fmt::Result {
        self.pending?;
        write!(self.out, "{value}")
    }

    /// A float; JSON has no NaN or infinities, they become `null`.
    pub fn f64(self, value: f64) -> fmt::Result {
        self.pending?;
        if value.is_finite() {
            // `{:?}` always keeps a `.0` or an exponent, like JSON floats do.
            write!(self.out, "{value:?}")
        } else {
            self.null()
        }
    }

    /// `Some(v)` as `v` (written by `f`), `None` as `null`.
    pub fn option<T, F>(self, value: Option<T>, f: F) -> fmt::Result
    where
        F: FnOnce(Value<'w, W>, T) -> fmt::Result,
    {
        match value {
            Some(v) => f(self, v),
            None => self.null(),
        }
    }

    /// A string, escaped.
    pub fn str(self, value: &str) -> fmt::Result {
        self.pending?;
        self.out.write_char('"')?;
        Escaper(&mut *self.out).write_str(value)?;
        self.out.write_char('"')
    }

    /// Anything `Display` as a string, escaped on the fly (no buffer): for
    /// error values and the like.
    pub fn display(self, value: impl Display) -> fmt::Result {
        self.pending?;
        self.out.write_char('"')?;
        write!(Escaper(&mut *self.out), "{value}")?;
        self.out.write_char('"')
    }

    /// An object whose fields `f` writes.
    pub fn object<F>(self, f: F) -> fmt::Result
    where
        F: FnOnce(&mut Object<'_, W>) -> fmt::Result,
    {
        self.pending?;
        self.out.write_char('{')?;
        let mut object = Object {
            out: &mut *self.out,
            first: true,
        };
        f(&mut object)?;
        self.out.write_char('}')
    }

    /// An array whose items `f` writes.
    pub fn array<F>(self, f: F) -> fmt::Result
    where
        F: FnOnce(&mut Array<'_, W>) -> fmt::Result,
    {
        self.pending?;
        self.out.write_char('[')?;
        let mut array = Array {
            out: &mut *self.out,
            first: true,
        };
        f(&mut array)?;
        self.out.write_char(']')
    }

    /// An array of unsigned integers.
    pub fn u64_array<I: IntoIterator<Item = u64>>(self, values: I) -> fmt::Result {
        self.array(|a| values.into_iter().try_for_each(|v| a.item().u64(v)))
    }
}

/// The inside of an object being written.
#[derive(Debug)]
pub struct Object<'w, W: Write> {
    out: &'w mut W,
    first: bool,
}

impl<W: Write> Object<'_, W> {
    /// Writes the key of the next field; the returned [`Value`] takes its
    /// value. If writing the key failed, writing the value returns the error.
    pub fn field(&mut self, key: &str) -> Value<'_, W> {
        let pending = self.key(key);
        Value {
            out: &mut *self.out,
            pending,
        }
    }

    fn key(&mut self, key: &str) -> fmt::Result {
        if !core::mem::replace(&mut self.first, false) {
            self.out.write_char(',')?;
        }
        Value::new(&mut *self.out).str(key)?;
        self.out.write_char(':')
    }
}

/// The inside of an array being written.
#[derive(Debug)]
pub struct Array<'w, W: Write> {
    out: &'w mut W,
    first: bool,
}

impl<W: Write> Array<'_, W> {
    /// The next item.
    pub fn item(&mut self) -> Value<'_, W> {
        let pending = if core::mem::replace(&mut self.first, false) {
            Ok(())
        } else {
            self.out.write_char(',')
        };
        Value {
            out: &mut *self.out,
            pending,
        }
    }
}

/// Escapes string contents as JSON requires: `"` and `\` get a backslash,
/// control characters become `\u00XX`. Everything else, including non-ASCII
/// text, is written as is (JSON text is UTF-8).
struct Escaper<'w, W: Write>(&'w mut W);

impl<W: Write> Write for Escaper<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain_from = 0;
        for (i, byte) in s.bytes().enumerate() {
            let escape = matches!(byte, b'"' | b'\\' | 0x00..=0x1f | 0x7f);
            if !escape {
                continue;
            }
            // Escaped characters are ASCII, so `i` is a char boundary.
            self.0.write_str(&s[plain_from..i])?;
            match byte {
                b'"' => self.0.write_str("\\\"")?,
                b'\\' => self.0.write_str("\\\\")?,
                _ => write!(self.0, "\\u{byte:04x}")?,
            }
            plain_from = i + 1;
        }
        self.0.write_str(&s[plain_from..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value as J, json};
    use std::string::String;

    fn render<F>(f: F) -> String
    where
        F: FnOnce(Value<'_, String>) -> fmt::Result,
    {
        let mut out = String::new();
        f(Value::new(&mut out)).unwrap();
        out
    }

    fn parse(text: &str) -> J {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn scalars() {
        assert_eq!(render(|v| v.null()), "null");
        assert_eq!(render(|v| v.bool(true)), "true");
        assert_eq!(render(|v| v.bool(false)), "false");
        assert_eq!(render(|v| v.u64(u64::MAX)), "18446744073709551615");
        assert_eq!(parse(&render(|v| v.u64(u64::MAX))), json!(u64::MAX));
        assert_eq!(parse(&render(|v| v.i64(i64::MIN))), json!(i64::MIN));
        assert_eq!(parse(&render(|v| v.f64(1.5))), json!(1.5));
        assert_eq!(parse(&render(|v| v.f64(-3.0))), json!(-3.0));
        assert_eq!(parse(&render(|v| v.f64(1e300))), json!(1e300));
        assert_eq!(render(|v| v.f64(f64::NAN)), "null");
        assert_eq!(render(|v| v.f64(f64::INFINITY)), "null");
        assert_eq!(render(|v| v.option(Some(5), Value::u64)), "5");
        assert_eq!(render(|v| v.option(None::<u64>, Value::u64)), "null");
    }

    #[test]
    fn strings_are_escaped() {
        let all_controls: String = (0u8..0x20).map(char::from).collect();
        let cases = [
            "",
            "plain",
            "quote \" and backslash \\ and slash /",
            "line\nfeed\r\ttab",
            "\u{7f} del",
            "unicode: é ✓ 🦀",
            "\\\"\\\"",
            all_controls.as_str(),
        ];
        for case in cases {
            let text = render(|v| v.str(case));
            assert_eq!(parse(&text), J::String(case.into()), "{text}");
            assert!(
                !text.bytes().any(|b| b < 0x20),
                "raw control byte in {text:?}"
            );
            let shown = render(|v| v.display(format_args!("<{case}>")));
            assert_eq!(parse(&shown), J::String(format!("<{case}>")));
        }
        assert_eq!(render(|v| v.str("a\u{1}b\n")), "\"a\\u0001b\\u000a\"");
    }

    #[test]
    fn nested_structures() {
        let text = render(|v| {
            v.object(|o| {
                o.field("loader").object(|o| {
                    o.field("protocol").str("pvh")?;
                    o.field("name").null()
                })?;
                o.field("cpus").object(|o| {
                    o.field("possible").u64(4)?;
                    o.field("failed").array(|_| Ok(()))?;
                    o.field("apic_ids").u64_array([0, 1, 2, 3])
                })?;
                o.field("mixed").array(|a| {
                    a.item().bool(true)?;
                    a.item().null()?;
                    a.item().array(|a| a.item().array(|_| Ok(())))?;
                    a.item().object(|_| Ok(()))?;
                    a.item().object(|o| o.field("k\"ey").str("v"))
                })?;
                o.field("empty").object(|_| Ok(()))
            })
        });
        assert_eq!(
            parse(&text),
            json!({
                "loader": {"protocol": "pvh", "name": null},
                "cpus": {"possible": 4, "failed": [], "apic_ids": [0, 1, 2, 3]},
                "mixed": [true, null, [[]], {}, {"k\"ey": "v"}],
                "empty": {}
            })
        );
    }

    #[test]
    fn report_line_format() {
        let mut line = String::new();
        report_line(&mut line, |o| {
            o.field("cmdline").object(|o| {
                o.field("raw").str("log=loud")?;
                o.field("errors").array(|a| {
                    a.item()
                        .display(format_args!("log: invalid value '{}'", "loud"))
                })
            })
        })
        .unwrap();
        assert!(line.starts_with("@hv {"));
        assert!(line.ends_with("}\n"));
        assert_eq!(line.matches('\n').count(), 1);
        assert_eq!(
            parse(&line[REPORT_MARKER.len()..]),
            json!({"cmdline": {"raw": "log=loud", "errors": ["log: invalid value 'loud'"]}})
        );
    }

    /// A writer that fails after `budget` bytes.
    struct Failing {
        budget: usize,
    }

    impl Write for Failing {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.budget = self.budget.checked_sub(s.len()).ok_or(fmt::Error)?;
            Ok(())
        }
    }

    #[test]
    fn writer_errors_propagate() {
        fn write<W: Write>(out: &mut W) -> fmt::Result {
            report_line(out, |o| {
                o.field("a").u64(1)?;
                o.field("b").array(|a| {
                    a.item().str("x")?;
                    a.item().u64(2)
                })
            })
        }
        let mut full = String::new();
        write(&mut full).unwrap();
        assert_eq!(full, "@hv {\"a\":1,\"b\":[\"x\",2]}\n");
        for budget in 0..full.len() + 5 {
            let result = write(&mut Failing { budget });
            assert_eq!(result.is_ok(), budget >= full.len(), "budget {budget}");
        }
    }
}
