//! A request's header fields as the request path reads them: hyper's header map, or the
//! lines of a head that attache's own HTTP/1.1 server parsed, read in place.
//!
//! A request that goes through as it came (the common case) never gets a header map: its
//! fields are looked up by a scan of the head's few lines and written upstream as sent. A
//! map is built ([`HeadLines::to_map`]) only for a try that must own its request (an HTTP/2
//! upstream, a streamed body, scatter-gather).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Where one field's name and value lie within a request head: name start and end, value
/// start and end.
pub type Span = (usize, usize, usize, usize);

/// The fields of a head attache parsed itself, in the order they were sent, names as sent.
#[derive(Debug, Clone, Copy)]
pub struct HeadLines<'a> {
    pub head: &'a [u8],
    pub spans: &'a [Span],
}

impl<'a> HeadLines<'a> {
    fn field(&self, s: &Span) -> (&'a [u8], &'a [u8]) {
        (&self.head[s.0..s.1], &self.head[s.2..s.3])
    }

    /// The first field named `name` (lower case) at or after index `from`: its index and
    /// value. Lengths are compared first, so most lines cost one comparison.
    fn find(&self, name: &[u8], from: usize) -> Option<(usize, &'a [u8])> {
        let spans = self.spans.get(from..)?;
        let i = spans.iter().position(|s| {
            s.1 - s.0 == name.len() && self.head[s.0..s.1].eq_ignore_ascii_case(name)
        })?;
        let s = &spans[i];
        Some((from + i, &self.head[s.2..s.3]))
    }

    /// The header map with these fields, in order. Fails only on a name or value that the
    /// head parser took but `http` does not (none is known).
    pub fn to_map(&self) -> Result<HeaderMap, crate::error::ProxyError> {
        let mut map = HeaderMap::with_capacity(self.spans.len() + 4);
        for s in self.spans {
            let (name, value) = self.field(s);
            let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            else {
                return Err(crate::error::ProxyError::BadRequest(
                    "invalid request header".into(),
                ));
            };
            map.append(name, value);
        }
        Ok(map)
    }
}

/// A request's header fields: a map, or a parsed head's lines (see the module doc).
#[derive(Debug, Clone, Copy)]
pub enum Fields<'a> {
    Map(&'a HeaderMap),
    Lines(HeadLines<'a>),
}

impl<'a> From<&'a HeaderMap> for Fields<'a> {
    fn from(map: &'a HeaderMap) -> Self {
        Fields::Map(map)
    }
}

impl<'a> Fields<'a> {
    /// The raw lines when there are any, else the map.
    pub fn of(map: &'a HeaderMap, raw: Option<HeadLines<'a>>) -> Fields<'a> {
        match raw {
            Some(r) => Fields::Lines(r),
            None => Fields::Map(map),
        }
    }

    /// Every field in order (for a map: grouped by name), as (name, value) bytes. Names from
    /// a map are lower case; raw names are as sent, so compare them with
    /// [`eq_name`] or `eq_ignore_ascii_case`.
    pub fn iter(&self) -> FieldsIter<'a> {
        match *self {
            Fields::Map(m) => FieldsIter::Map(m.iter()),
            Fields::Lines(r) => FieldsIter::Lines(r, r.spans.iter()),
        }
    }

    /// The first value of `name`.
    pub fn get(&self, name: &HeaderName) -> Option<&'a [u8]> {
        match *self {
            Fields::Map(m) => m.get(name).map(HeaderValue::as_bytes),
            Fields::Lines(l) => l.find(name.as_str().as_bytes(), 0).map(|(_, v)| v),
        }
    }

    /// Every value of `name`, in order.
    pub fn get_all<'n>(&self, name: &'n HeaderName) -> Values<'a, 'n> {
        match *self {
            Fields::Map(m) => Values::Map(m.get_all(name).iter()),
            Fields::Lines(lines) => Values::Lines {
                lines,
                name: name.as_str().as_bytes(),
                next: 0,
            },
        }
    }

    /// Whether `name` is among the fields.
    pub fn contains(&self, name: &HeaderName) -> bool {
        match *self {
            Fields::Map(m) => m.contains_key(name),
            Fields::Lines(l) => l.find(name.as_str().as_bytes(), 0).is_some(),
        }
    }

    /// The first value of `name` if it is visible ASCII (what `HeaderValue::to_str` takes).
    pub fn text(&self, name: &HeaderName) -> Option<&'a str> {
        as_text(self.get(name)?)
    }
}

/// A field value as text, if it is visible ASCII or tabs (the rule of `HeaderValue::to_str`).
pub fn as_text(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// Whether a field name as sent is `name` (field names are case-insensitive).
pub fn eq_name(sent: &[u8], name: &HeaderName) -> bool {
    sent.eq_ignore_ascii_case(name.as_str().as_bytes())
}

/// The iterator of [`Fields::iter`].
pub enum FieldsIter<'a> {
    Map(header::Iter<'a, HeaderValue>),
    Lines(HeadLines<'a>, std::slice::Iter<'a, Span>),
}

impl<'a> Iterator for FieldsIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            FieldsIter::Map(it) => it
                .next()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
            FieldsIter::Lines(r, it) => it.next().map(|s| r.field(s)),
        }
    }
}

/// The iterator of [`Fields::get_all`].
pub enum Values<'a, 'n> {
    Map(header::ValueIter<'a, HeaderValue>),
    Lines {
        lines: HeadLines<'a>,
        name: &'n [u8],
        next: usize,
    },
}

impl<'a> Iterator for Values<'a, '_> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            Values::Map(it) => it.next().map(HeaderValue::as_bytes),
            Values::Lines { lines, name, next } => {
                let (i, value) = lines.find(name, *next)?;
                *next = i + 1;
                Some(value)
            }
        }
    }
}

/// Where the fields of a whole request head lie, as attache's own server records them (for
/// tests).
#[cfg(test)]
pub(crate) fn spans_of(head: &[u8]) -> Vec<Span> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    assert!(req.parse(head).unwrap().is_complete());
    let base = head.as_ptr() as usize;
    req.headers
        .iter()
        .map(|h| {
            let n = h.name.as_ptr() as usize - base;
            let v = h.value.as_ptr() as usize - base;
            (n, n + h.name.len(), v, v + h.value.len())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_lines_read_like_the_map_built_from_them() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Tag: 1\r\nCookie: a=1\r\nx-tag: 2\r\nX-Bin: \xe9\r\n\r\n";
        let spans = spans_of(head);
        let raw = Fields::Lines(HeadLines {
            head,
            spans: &spans,
        });
        let Fields::Lines(lines) = raw else {
            unreachable!()
        };
        let map = lines.to_map().unwrap();
        let map = Fields::Map(&map);
        let tag = HeaderName::from_static("x-tag");
        let bin = HeaderName::from_static("x-bin");
        let missing = HeaderName::from_static("x-missing");
        for f in [raw, map] {
            assert_eq!(f.get(&tag), Some(&b"1"[..]));
            assert_eq!(f.get_all(&tag).collect::<Vec<_>>(), [b"1", b"2"]);
            assert_eq!(f.text(&header::HOST), Some("a"));
            assert!(f.contains(&header::COOKIE));
            assert!(!f.contains(&missing));
            assert_eq!(f.get(&bin), Some(&b"\xe9"[..]));
            assert_eq!(f.text(&bin), None, "obs-text is not text");
            assert_eq!(f.iter().count(), 5);
        }
        // Raw names stay as sent; the map's are lower case.
        assert_eq!(raw.iter().next().unwrap().0, b"Host");
        assert_eq!(map.iter().next().unwrap().0, b"host");
    }
}
