//! Path templates such as `/images/{user}/{rest*}`, and the captures a match yields.

/// Most captures one template may name; the captures of a match live on the stack.
pub const MAX_CAPTURES: usize = 8;

/// A compiled path template: literal segments, `{name}` (one segment) and a final `{name*}`
/// (the rest of the path, possibly empty).
#[derive(Debug, Clone)]
pub struct Template {
    source: String,
    segments: Vec<Segment>,
    names: Vec<String>,
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Var(u8),
    Rest(u8),
}

/// The byte ranges of a request path that a template captured. No allocation: the ranges index
/// the path they came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Captures {
    len: u8,
    spans: [(u8, u32, u32); MAX_CAPTURES],
}

impl Captures {
    fn push(&mut self, name: u8, start: usize, end: usize) {
        if (self.len as usize) < MAX_CAPTURES {
            self.spans[self.len as usize] = (name, start as u32, end as u32);
            self.len += 1;
        }
    }

    /// The captured text for `name` (an index into [`Template::names`]).
    pub fn get<'p>(&self, name: usize, path: &'p str) -> Option<&'p str> {
        self.spans[..self.len as usize]
            .iter()
            .find(|(n, _, _)| *n as usize == name)
            .and_then(|&(_, s, e)| path.get(s as usize..e as usize))
    }

    /// Every capture as (name index, text).
    pub fn iter<'a, 'p: 'a>(
        &'a self,
        path: &'p str,
    ) -> impl Iterator<Item = (usize, &'p str)> + 'a {
        self.spans[..self.len as usize]
            .iter()
            .map(move |&(n, s, e)| (n as usize, path.get(s as usize..e as usize).unwrap_or("")))
    }
}

impl Template {
    /// Compiles a template; errors say what is wrong in the user's words.
    pub fn parse(source: &str) -> Result<Template, String> {
        if !source.starts_with('/') {
            return Err("a template must start with `/`".into());
        }
        let mut segments = Vec::new();
        let mut names: Vec<String> = Vec::new();
        let parts: Vec<&str> = source[1..].split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                let (name, rest) = match inner.strip_suffix('*') {
                    Some(n) => (n, true),
                    None => (inner, false),
                };
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(format!(
                        "`{{{inner}}}`: a capture name is letters, digits and `_`"
                    ));
                }
                if names.iter().any(|n| n == name) {
                    return Err(format!("capture `{name}` appears twice"));
                }
                if names.len() == MAX_CAPTURES {
                    return Err(format!("at most {MAX_CAPTURES} captures"));
                }
                if rest && i + 1 != parts.len() {
                    return Err(format!("`{{{name}*}}` must be the last segment"));
                }
                let index = names.len() as u8;
                names.push(name.to_owned());
                segments.push(if rest {
                    Segment::Rest(index)
                } else {
                    Segment::Var(index)
                });
            } else if part.contains('{') || part.contains('}') {
                return Err(format!(
                    "`{part}`: a capture must be a whole segment, like `{{name}}`"
                ));
            } else {
                segments.push(Segment::Literal((*part).to_owned()));
            }
        }
        Ok(Template {
            source: source.to_owned(),
            segments,
            names,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Capture names, in order; [`Captures`] refer to them by index.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Index of a capture name.
    pub fn name_index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Matches a path (without query); fills `captures` on success.
    pub fn matches(&self, path: &str, captures: &mut Captures) -> bool {
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut offset = 1usize;
        let mut out = Captures::default();
        let last = self.segments.len().saturating_sub(1);
        for (i, seg) in self.segments.iter().enumerate() {
            if let Segment::Rest(name) = seg {
                out.push(*name, offset, offset + rest.len());
                *captures = out;
                return true;
            }
            let (part, tail) = match rest.find('/') {
                Some(j) => (&rest[..j], Some(&rest[j + 1..])),
                None => (rest, None),
            };
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Var(name) if !part.is_empty() => {
                    out.push(*name, offset, offset + part.len())
                }
                _ => return false,
            }
            match tail {
                Some(t) if i < last => {
                    offset += part.len() + 1;
                    rest = t;
                }
                None if i == last => {
                    *captures = out;
                    return true;
                }
                // `/a/{b*}` also matches `/a`: the rest is empty.
                None if i + 1 == last && matches!(self.segments[last], Segment::Rest(_)) => {
                    if let Segment::Rest(name) = self.segments[last] {
                        out.push(name, path.len(), path.len());
                    }
                    *captures = out;
                    return true;
                }
                _ => return false,
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        let t = Template::parse(t).unwrap();
        let mut c = Captures::default();
        t.matches(path, &mut c).then(|| {
            c.iter(path)
                .map(|(n, v)| (t.names()[n].clone(), v.to_owned()))
                .collect()
        })
    }

    fn pairs(list: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            list.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
    }

    #[test]
    fn matches_table() {
        let cases: &[(&str, &str, Option<Vec<(String, String)>>)] = &[
            (
                "/images/{user}",
                "/images/priya",
                pairs(&[("user", "priya")]),
            ),
            ("/images/{user}", "/images/priya/x", None),
            ("/images/{user}", "/images/", None),
            ("/images/{user}", "/image/priya", None),
            (
                "/images/{user}/{rest*}",
                "/images/priya/a/b.png",
                pairs(&[("user", "priya"), ("rest", "a/b.png")]),
            ),
            (
                "/images/{user}/{rest*}",
                "/images/priya/",
                pairs(&[("user", "priya"), ("rest", "")]),
            ),
            (
                "/images/{user}/{rest*}",
                "/images/priya",
                pairs(&[("user", "priya"), ("rest", "")]),
            ),
            ("/a/b", "/a/b", pairs(&[])),
            ("/a/b", "/a/b/", None),
            ("/", "/", pairs(&[])),
            ("/{all*}", "/x/y", pairs(&[("all", "x/y")])),
            ("/u/{id}/feed", "/u/7/feed", pairs(&[("id", "7")])),
            ("/u/{id}/feed", "/u/7/other", None),
        ];
        for (t, path, want) in cases {
            assert_eq!(&caps(t, path), want, "template {t} path {path}");
        }
    }

    #[test]
    fn refuses_bad_templates() {
        assert!(Template::parse("images").is_err());
        assert!(Template::parse("/{a*}/b")
            .unwrap_err()
            .contains("last segment"));
        assert!(Template::parse("/{a}/{a}").unwrap_err().contains("twice"));
        assert!(Template::parse("/x{a}")
            .unwrap_err()
            .contains("whole segment"));
        assert!(Template::parse("/{a-b}").is_err());
    }
}
