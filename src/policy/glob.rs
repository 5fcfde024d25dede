//! ClusterImagePolicy image globs, with policy-controller's semantics, and the compiled index
//! that selects the policies covering an image.
//!
//! `**` matches anything including `/`; `*` matches anything but `/` (it crosses `:` and `@`);
//! every other character is literal; the whole image string must match. The glob `*` alone
//! means `index.docker.io/library/*` and `*/*` alone means `index.docker.io/*/*`.

use std::collections::HashMap;

use regex::Regex;

/// Why a glob is not valid.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GlobError {
    #[error("glob is empty")]
    Empty,
    #[error(
        "glob {glob:?} has invalid character {ch:?}; allowed: letters, digits and - _ : / * . @"
    )]
    InvalidChar { glob: String, ch: char },
    #[error("glob {glob:?} does not compile: {message}")]
    Compile { glob: String, message: String },
}

/// Checks the characters of a glob.
pub fn validate_glob(glob: &str) -> Result<(), GlobError> {
    if glob.is_empty() {
        return Err(GlobError::Empty);
    }
    match glob
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_:/*.@".contains(*c)))
    {
        Some(ch) => Err(GlobError::InvalidChar {
            glob: glob.to_string(),
            ch,
        }),
        None => Ok(()),
    }
}

/// The glob as matched: the two Docker Hub shorthands expanded.
fn expand(glob: &str) -> &str {
    match glob {
        "*" => "index.docker.io/library/*",
        "*/*" => "index.docker.io/*/*",
        other => other,
    }
}

/// An anchored regular expression equivalent to `glob` (already expanded).
fn to_regex(glob: &str) -> String {
    let mut re = String::with_capacity(glob.len() * 2 + 2);
    re.push('^');
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '*' {
            if chars.peek() == Some(&'*') {
                chars.next();
                re.push_str(".*");
            } else {
                re.push_str("[^/]*");
            }
        } else {
            re.push_str(&regex::escape(c.encode_utf8(&mut [0; 4])));
        }
    }
    re.push('$');
    re
}

/// One compiled glob.
#[derive(Debug, Clone)]
pub struct Glob {
    source: String,
    regex: Regex,
}

impl Glob {
    pub fn new(glob: &str) -> Result<Glob, GlobError> {
        validate_glob(glob)?;
        let regex = Regex::new(&to_regex(expand(glob))).map_err(|e| GlobError::Compile {
            glob: glob.to_string(),
            message: e.to_string(),
        })?;
        Ok(Glob {
            source: glob.to_string(),
            regex,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole `image` string matches.
    pub fn matches(&self, image: &str) -> bool {
        self.regex.is_match(image)
    }
}

/// Every glob of every policy in one matcher, built once per snapshot.
///
/// Globs without wildcards are found by one hash lookup. Wildcard globs are filed under their
/// literal prefix (the text before the first `*`): a query looks up each distinct prefix length
/// once and runs only the regexes of globs whose prefix it starts with, so the cost depends on
/// the number of distinct prefix lengths and of candidates, not on the number of globs.
#[derive(Debug, Default)]
pub struct GlobIndex {
    exact: HashMap<String, Vec<usize>>,
    by_prefix: HashMap<String, Vec<usize>>,
    /// Distinct prefix lengths in `by_prefix`, ascending.
    prefix_lens: Vec<usize>,
    wildcard: Vec<(Glob, usize)>,
    len: usize,
}

impl GlobIndex {
    /// `entries` are (glob, owner) pairs; owners are policy indices and may repeat.
    pub fn new<'a>(
        entries: impl IntoIterator<Item = (&'a str, usize)>,
    ) -> Result<GlobIndex, GlobError> {
        let mut index = GlobIndex::default();
        for (glob, owner) in entries {
            index.len += 1;
            let expanded = expand(glob);
            match expanded.find('*') {
                None => {
                    validate_glob(glob)?;
                    index
                        .exact
                        .entry(expanded.to_string())
                        .or_default()
                        .push(owner);
                }
                Some(star) => {
                    let compiled = Glob::new(glob)?;
                    let prefix = &expanded[..star];
                    index
                        .by_prefix
                        .entry(prefix.to_string())
                        .or_default()
                        .push(index.wildcard.len());
                    index.wildcard.push((compiled, owner));
                }
            }
        }
        index.prefix_lens = index.by_prefix.keys().map(String::len).collect();
        index.prefix_lens.sort_unstable();
        index.prefix_lens.dedup();
        Ok(index)
    }

    /// Sorted, deduplicated owners with a glob matching any of `images`.
    pub fn matching(&self, images: &[&str]) -> Vec<usize> {
        let mut owners = Vec::new();
        for image in images {
            if let Some(found) = self.exact.get(*image) {
                owners.extend_from_slice(found);
            }
            for &len in &self.prefix_lens {
                if len > image.len() {
                    break;
                }
                if !image.is_char_boundary(len) {
                    continue;
                }
                let Some(candidates) = self.by_prefix.get(&image[..len]) else {
                    continue;
                };
                for &c in candidates {
                    let (glob, owner) = &self.wildcard[c];
                    if glob.matches(image) {
                        owners.push(*owner);
                    }
                }
            }
        }
        owners.sort_unstable();
        owners.dedup();
        owners
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_stays_within_a_path_component() {
        let g = Glob::new("ghcr.io/org/*").unwrap();
        assert!(g.matches("ghcr.io/org/app:v1"));
        assert!(g.matches("ghcr.io/org/app@sha256:00"));
        assert!(!g.matches("ghcr.io/org/team/app:v1"));
        assert!(Glob::new("ghcr.io/org/**")
            .unwrap()
            .matches("ghcr.io/org/team/app:v1"));
    }

    #[test]
    fn index_finds_exact_prefix_and_anywhere_globs() {
        let index = GlobIndex::new([
            ("ghcr.io/org/app:v1", 0),
            ("ghcr.io/org/*", 1),
            ("**", 2),
            ("quay.io/**", 3),
            ("*", 4),
        ])
        .unwrap();
        assert_eq!(index.matching(&["ghcr.io/org/app:v1"]), [0, 1, 2]);
        assert_eq!(index.matching(&["index.docker.io/library/nginx:1"]), [2, 4]);
        assert_eq!(index.len(), 5);
        assert!(GlobIndex::new([("bad glob", 0)]).is_err());
    }
}
