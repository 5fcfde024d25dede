//! ClusterImagePolicy image globs, with sigstore policy-controller's semantics, and the
//! compiled index that selects the policies covering an image.
//!
//! A glob is matched against a normalized image string (`index.docker.io/library/nginx:1.27`,
//! `ghcr.io/o/r@sha256:…`), and the whole string must match. `**` matches any sequence,
//! `/` included; `*` matches any sequence without `/` (it does cross `:` and `@`); every other
//! character is literal. The glob `*` alone means `index.docker.io/library/*` and `*/*` alone
//! means `index.docker.io/*/*`. Valid glob characters are `[A-Za-z0-9-_:/*.@]`.
//!
//! A glob is compiled as its literal prefix (text before the first `*`) plus a matcher for
//! the rest; the common rests (`**`, `*`, `**:latest`, `*:v1`, nothing) are matched without a
//! regular expression, and the others with one anchored byte regex.
//!
//! [`GlobIndex`] files every glob under its longest literal key, in one of three byte tries:
//! its literal prefix (text before the first `*`), its literal suffix (text after the last
//! `*`, stored reversed), or its longest literal between two `*`s (`**/mirror/*`). A query
//! walks the prefix trie once along the image, the suffix trie once along the reversed image,
//! and the infix trie from each position of the image (only when it holds any glob), and runs
//! only the globs whose key it meets. The cost thus depends on the image length and on the
//! globs sharing a literal with the image, not on the total number of globs; only globs
//! without any literal (`**`, `*:*`) are tried on every query.

use regex::bytes::Regex;

/// Why a glob is not valid.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GlobError {
    #[error("glob is empty")]
    Empty,
    #[error(
        "glob {glob:?} has invalid character {ch:?}; allowed: letters, digits and - _ : / * . @"
    )]
    InvalidChar { glob: String, ch: char },
    /// Only for absurdly large globs, past the regex engine's size limit.
    #[error("glob {glob:?} is too large to compile: {message}")]
    Compile { glob: String, message: String },
}

fn is_glob_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '/' | '*' | '.' | '@')
}

/// Checks that `glob` is non-empty and uses only `[A-Za-z0-9-_:/*.@]`.
pub fn validate_glob(glob: &str) -> Result<(), GlobError> {
    if glob.is_empty() {
        return Err(GlobError::Empty);
    }
    match glob.chars().find(|c| !is_glob_char(*c)) {
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

/// How the part of the image after the literal prefix is matched.
#[derive(Debug, Clone)]
enum Rest {
    /// Nothing may follow: the glob has no wildcard.
    Nothing,
    /// `**…` then a literal: anything ending with the literal (possibly empty).
    AnyThen(String),
    /// `*` then a literal: anything ending with the literal, with no `/` before it.
    SegmentThen(String),
    /// Anything else, as an anchored regex over the rest.
    Regex(Regex),
}

impl Rest {
    fn matches(&self, rest: &str) -> bool {
        match self {
            Rest::Nothing => rest.is_empty(),
            Rest::AnyThen(lit) => rest.ends_with(lit.as_str()),
            Rest::SegmentThen(lit) => rest
                .strip_suffix(lit.as_str())
                .is_some_and(|head| !head.contains('/')),
            Rest::Regex(re) => re.is_match(rest.as_bytes()),
        }
    }
}

/// One piece of a glob after the literal prefix.
enum Piece<'a> {
    Literal(&'a str),
    /// A run of one `*`.
    Segment,
    /// A run of two or more `*` (`.*` followed by `[^/]*` is still `.*`).
    Any,
}

/// Splits `rest` (which starts with `*` or is empty) into literals and star runs.
fn pieces(rest: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut s = rest;
    while !s.is_empty() {
        let stars = s.len() - s.trim_start_matches('*').len();
        match stars {
            0 => {
                let end = s.find('*').unwrap_or(s.len());
                out.push(Piece::Literal(&s[..end]));
                s = &s[end..];
            }
            1 => {
                out.push(Piece::Segment);
                s = &s[1..];
            }
            n => {
                out.push(Piece::Any);
                s = &s[n..];
            }
        }
    }
    out
}

fn compile_rest(glob: &str, pieces: &[Piece<'_>]) -> Result<Rest, GlobError> {
    match pieces {
        [] => return Ok(Rest::Nothing),
        [Piece::Any] => return Ok(Rest::AnyThen(String::new())),
        [Piece::Segment] => return Ok(Rest::SegmentThen(String::new())),
        [Piece::Any, Piece::Literal(lit)] => return Ok(Rest::AnyThen(lit.to_string())),
        [Piece::Segment, Piece::Literal(lit)] => return Ok(Rest::SegmentThen(lit.to_string())),
        _ => {}
    }
    // Byte semantics (no Unicode): `[^/]` is one byte, which on UTF-8 text matches exactly
    // what a character class would, since `/` never occurs inside a multi-byte character.
    let mut re = String::from("(?-u)^");
    for piece in pieces {
        match piece {
            Piece::Literal(lit) => re.push_str(&regex::escape(lit)),
            Piece::Segment => re.push_str("[^/]*"),
            Piece::Any => re.push_str(".*"),
        }
    }
    re.push('$');
    Regex::new(&re)
        .map(Rest::Regex)
        .map_err(|e| GlobError::Compile {
            glob: glob.to_string(),
            message: e.to_string(),
        })
}

/// One compiled glob.
#[derive(Debug, Clone)]
pub struct Glob {
    source: String,
    /// The expanded glob's text before its first `*` (all of it when it has none).
    prefix: String,
    /// The expanded glob's text after its last `*` (empty when it has none).
    suffix: String,
    /// The longest literal between two `*`s (empty when there is none).
    infix: String,
    rest: Rest,
}

impl Glob {
    /// Validates and compiles `glob`.
    pub fn new(glob: &str) -> Result<Glob, GlobError> {
        validate_glob(glob)?;
        let expanded = expand(glob);
        let (prefix, suffix, rest) = match (expanded.find('*'), expanded.rfind('*')) {
            (Some(first), Some(last)) => (
                &expanded[..first],
                &expanded[last + 1..],
                &expanded[first..],
            ),
            _ => (expanded, "", ""),
        };
        let pieces = pieces(rest);
        // Literals between stars: all but a trailing one (that is the suffix).
        let inner = match pieces.split_last() {
            Some((Piece::Literal(_), inner)) => inner,
            _ => &pieces[..],
        };
        let infix = inner
            .iter()
            .filter_map(|p| match p {
                Piece::Literal(lit) => Some(*lit),
                _ => None,
            })
            .max_by_key(|lit| lit.len())
            .unwrap_or("");
        Ok(Glob {
            source: glob.to_string(),
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
            infix: infix.to_string(),
            rest: compile_rest(glob, &pieces)?,
        })
    }

    /// The glob as written (shorthands not expanded).
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole `image` string matches.
    pub fn matches(&self, image: &str) -> bool {
        image
            .strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| self.rest.matches(rest))
    }

    /// Whether `image` matches, given that it is known to start with the literal prefix.
    fn matches_after_prefix(&self, image: &str) -> bool {
        image
            .get(self.prefix.len()..)
            .is_some_and(|rest| self.rest.matches(rest))
    }
}

/// A byte trie mapping string keys to lists of glob indices.
#[derive(Debug, Clone)]
struct Trie {
    nodes: Vec<Node>,
    /// Number of globs filed.
    count: usize,
}

#[derive(Debug, Clone, Default)]
struct Node {
    /// Children sorted by byte.
    children: Vec<(u8, usize)>,
    /// Globs filed under the key ending here.
    globs: Vec<usize>,
}

impl Default for Trie {
    fn default() -> Self {
        Trie {
            nodes: vec![Node::default()],
            count: 0,
        }
    }
}

impl Trie {
    fn insert(&mut self, key: impl Iterator<Item = u8>, glob: usize) {
        let mut at = 0usize;
        for byte in key {
            let next_id = self.nodes.len();
            let node = &mut self.nodes[at];
            at = match node.children.binary_search_by_key(&byte, |c| c.0) {
                Ok(i) => node.children[i].1,
                Err(i) => {
                    node.children.insert(i, (byte, next_id));
                    self.nodes.push(Node::default());
                    next_id
                }
            };
        }
        self.nodes[at].globs.push(glob);
        self.count += 1;
    }

    /// Calls `visit` with the globs of every key that is a prefix of `key`, shortest first.
    fn walk(&self, key: impl Iterator<Item = u8>, mut visit: impl FnMut(&[usize])) {
        let Some(mut node) = self.nodes.first() else {
            return;
        };
        visit(&node.globs);
        for byte in key {
            let Ok(i) = node.children.binary_search_by_key(&byte, |c| c.0) else {
                return;
            };
            let Some(next) = self.nodes.get(node.children[i].1) else {
                return;
            };
            node = next;
            if !node.globs.is_empty() {
                visit(&node.globs);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn shrink(&mut self) {
        self.nodes.shrink_to_fit();
        for node in &mut self.nodes {
            node.children.shrink_to_fit();
            node.globs.shrink_to_fit();
        }
    }
}

/// All globs of all policies compiled into one matcher. Built once per policy snapshot;
/// queried on every pull.
#[derive(Debug, Clone, Default)]
pub struct GlobIndex {
    globs: Vec<(Glob, usize)>,
    /// Globs filed by literal prefix (all exact globs, and those whose prefix is at least as
    /// long as their suffix).
    by_prefix: Trie,
    /// Globs filed by literal suffix, bytes reversed.
    by_suffix: Trie,
    /// Globs filed by a literal between two stars, found anywhere in the image.
    by_infix: Trie,
}

impl GlobIndex {
    /// entries: (glob text, owner id). Owners are small integers (policy index); an owner can
    /// have many globs. Fails on the first invalid glob.
    pub fn new<'a>(
        entries: impl IntoIterator<Item = (&'a str, usize)>,
    ) -> Result<GlobIndex, GlobError> {
        let mut index = GlobIndex::default();
        for (text, owner) in entries {
            let glob = Glob::new(text)?;
            let id = index.globs.len();
            let (p, s, m) = (glob.prefix.len(), glob.suffix.len(), glob.infix.len());
            if p >= s && p >= m {
                index.by_prefix.insert(glob.prefix.bytes(), id);
            } else if s >= m {
                index.by_suffix.insert(glob.suffix.bytes().rev(), id);
            } else {
                index.by_infix.insert(glob.infix.bytes(), id);
            }
            index.globs.push((glob, owner));
        }
        index.globs.shrink_to_fit();
        index.by_prefix.shrink();
        index.by_suffix.shrink();
        index.by_infix.shrink();
        Ok(index)
    }

    /// Sorted, deduplicated owner ids with at least one glob matching any of `images` (callers
    /// pass the tag form and the digest form of one image).
    pub fn matching(&self, images: &[&str]) -> Vec<usize> {
        let mut owners = Vec::new();
        for image in images {
            self.collect(image, &mut owners);
        }
        owners.sort_unstable();
        owners.dedup();
        owners
    }

    /// Pushes the owners of the globs matching `image`; returns how many globs were tried.
    fn collect(&self, image: &str, owners: &mut Vec<usize>) -> usize {
        let mut tried = 0;
        self.by_prefix.walk(image.bytes(), |ids| {
            for &id in ids {
                if let Some((glob, owner)) = self.globs.get(id) {
                    tried += 1;
                    if glob.matches_after_prefix(image) {
                        owners.push(*owner);
                    }
                }
            }
        });
        let mut check = |ids: &[usize]| {
            for &id in ids {
                if let Some((glob, owner)) = self.globs.get(id) {
                    tried += 1;
                    if glob.matches(image) {
                        owners.push(*owner);
                    }
                }
            }
        };
        self.by_suffix.walk(image.bytes().rev(), &mut check);
        if !self.by_infix.is_empty() {
            // Infix keys are never empty, so no root visit finds anything; a glob whose key
            // occurs twice in the image is tried twice, which only costs a duplicate owner.
            for start in 0..image.len() {
                let from = image.as_bytes().get(start..).unwrap_or_default();
                self.by_infix.walk(from.iter().copied(), &mut check);
            }
        }
        tried
    }

    /// Number of globs (entries) in the index.
    pub fn len(&self) -> usize {
        self.globs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.globs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn glob(g: &str) -> Glob {
        Glob::new(g).unwrap_or_else(|e| panic!("{e}"))
    }

    fn index(entries: &[(&str, usize)]) -> GlobIndex {
        GlobIndex::new(entries.iter().copied()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn validation() {
        assert_eq!(validate_glob(""), Err(GlobError::Empty));
        assert!(validate_glob("ghcr.io/o_r-g/*:v1.2@sha256:*").is_ok());
        for (g, ch) in [
            ("a^", '^'),
            ("a$", '$'),
            ("a?", '?'),
            ("[a]", '['),
            ("a b", ' '),
            ("a+b", '+'),
            ("ghcr.io/é", 'é'),
        ] {
            assert_eq!(
                validate_glob(g),
                Err(GlobError::InvalidChar {
                    glob: g.to_string(),
                    ch
                })
            );
        }
        assert_eq!(
            validate_glob("x^").map_err(|e| e.to_string()),
            Err(
                "glob \"x^\" has invalid character '^'; allowed: letters, digits and - _ : / * . @"
                    .to_string()
            )
        );
        assert!(Glob::new("").is_err());
        assert!(GlobIndex::new([("ok/**", 0), ("bad glob", 1)]).is_err());
    }

    #[test]
    fn star_stays_within_a_path_component() {
        let g = glob("ghcr.io/org/*");
        assert!(g.matches("ghcr.io/org/app:v1"));
        assert!(g.matches(&format!("ghcr.io/org/app@{D}")));
        assert!(g.matches("ghcr.io/org/"));
        assert!(!g.matches("ghcr.io/org/team/app:v1"));
        assert!(glob("ghcr.io/org/**").matches("ghcr.io/org/team/app:v1"));
        assert!(glob("ghcr.io/*/app:*").matches("ghcr.io/org/app:v1"));
        assert!(!glob("ghcr.io/*/app:*").matches("ghcr.io/a/b/app:v1"));
    }

    #[test]
    fn shorthands() {
        assert!(glob("*").matches("index.docker.io/library/nginx:1.27"));
        assert!(!glob("*").matches("index.docker.io/myorg/app:1"));
        assert!(!glob("*").matches("nginx"));
        assert!(glob("*/*").matches("index.docker.io/myorg/app:1"));
        assert!(glob("*/*").matches("index.docker.io/library/nginx:1"));
        assert!(!glob("*/*").matches("ghcr.io/o/r:1"));
        assert_eq!(glob("*").as_str(), "*");
        // Only the whole glob is a shorthand.
        assert!(glob("*/**").matches("ghcr.io/o/r:1"));
        assert!(!glob("**/*").matches("nginx:latest"));
    }

    #[test]
    fn literals_and_anchoring() {
        let g = glob("ghcr.io/foo");
        assert!(g.matches("ghcr.io/foo"));
        assert!(!g.matches("ghcr.io/foo-suffix"));
        assert!(!g.matches("prefix-ghcr.io/foo"));
        assert!(!glob("ghcr.io/**").matches("ghcrxio/foo"));
        assert!(glob("**:latest").matches("ghcr.io/a/b:latest"));
        assert!(!glob("**:latest").matches("ghcr.io/a/b:latest2"));
        assert!(glob("*a*b*").matches("xaybz"));
        assert!(!glob("*a*b*").matches("xa/ybz"));
        assert!(glob("**a*b").matches("x/ayb"));
        assert!(!glob("**a*b").matches("x/a/yb"));
        assert!(glob("a***").matches("a/b/c"));
        assert!(glob("ghcr.io/o/r@sha256:*").matches(&format!("ghcr.io/o/r@{D}")));
    }

    #[test]
    fn rest_matchers_agree_with_regex() {
        // Every fast path must give the regex's answer.
        let images = [
            "",
            "a",
            "a/b",
            "ghcr.io/o/r:latest",
            "ghcr.io/o/r/x:latest",
            ":latest",
            "/:latest",
            "x/",
            "é/:latest",
        ];
        for rest in ["", "*", "**", "***", "*:latest", "**:latest", "*/", "**/"] {
            let fast = compile_rest("t", &pieces(rest)).unwrap_or_else(|e| panic!("{e}"));
            let mut re = String::from("(?-u)^");
            for p in pieces(rest) {
                match p {
                    Piece::Literal(l) => re.push_str(&regex::escape(l)),
                    Piece::Segment => re.push_str("[^/]*"),
                    Piece::Any => re.push_str(".*"),
                }
            }
            re.push('$');
            let slow = Regex::new(&re).unwrap_or_else(|e| panic!("{e}"));
            for image in images {
                assert_eq!(
                    fast.matches(image),
                    slow.is_match(image.as_bytes()),
                    "rest {rest:?} image {image:?}"
                );
            }
        }
    }

    #[test]
    fn index_finds_exact_prefix_suffix_and_anywhere_globs() {
        let index = index(&[
            ("ghcr.io/org/app:v1", 0),
            ("ghcr.io/org/*", 1),
            ("**", 2),
            ("quay.io/**", 3),
            ("*", 4),
            ("**:latest", 5),
            ("**/app:v1", 6),
            ("ghcr.io/**", 7),
            ("ghcr.io/org/**", 7),
        ]);
        assert_eq!(index.len(), 9);
        assert!(!index.is_empty());
        assert_eq!(index.matching(&["ghcr.io/org/app:v1"]), [0, 1, 2, 6, 7]);
        assert_eq!(
            index.matching(&["index.docker.io/library/nginx:latest"]),
            [2, 4, 5]
        );
        assert_eq!(index.matching(&["quay.io/x/y:1"]), [2, 3]);
        assert_eq!(index.matching(&[]), Vec::<usize>::new());
        let digest = format!("ghcr.io/org/app@{D}");
        assert_eq!(index.matching(&["ghcr.io/org/app:v2", &digest]), [1, 2, 7]);
    }

    #[test]
    fn index_without_globs() {
        let empty = index(&[]);
        assert!(empty.is_empty());
        assert_eq!(empty.matching(&["ghcr.io/a/b:c"]), Vec::<usize>::new());
    }

    #[test]
    fn index_agrees_with_linear_scan() {
        let globs = [
            "ghcr.io/org/*",
            "ghcr.io/org/app",
            "ghcr.io/org/app:*",
            "ghcr.io/**",
            "ghcr.io/*/*:v1",
            "**/app*",
            "**@sha256:*",
            "*:latest",
            "*/*",
            "*",
            "localhost:5000/**",
            "index.docker.io/library/nginx:1.27",
            "**",
            "ghcr*",
            "g*",
            "**/org/*",
            "**/app:*",
            "**o*",
            "*/*/app*:*",
            "**/x/**/x/*",
            "**a**a",
        ];
        let index = index(
            &globs
                .iter()
                .enumerate()
                .map(|(i, g)| (*g, i))
                .collect::<Vec<_>>(),
        );
        let compiled: Vec<Glob> = globs.iter().map(|g| glob(g)).collect();
        let images = [
            "ghcr.io/org/app",
            "ghcr.io/org/app:v1",
            "ghcr.io/org/app:latest",
            "ghcr.io/x/y:v1",
            "ghcr.io/x/y/z:v1",
            "index.docker.io/library/nginx:1.27",
            "index.docker.io/library/nginx:latest",
            "index.docker.io/me/app:latest",
            "localhost:5000/app:1",
            "gx",
            "",
            "quay.io/x/a/x/b:a",
            "a/a",
            "mirror.local/org/app:v1",
            "é/ü:latest",
            &format!("ghcr.io/org/app@{D}"),
        ];
        for image in images {
            let want: Vec<usize> = compiled
                .iter()
                .enumerate()
                .filter(|(_, g)| g.matches(image))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(index.matching(&[image]), want, "{image}");
        }
    }

    #[test]
    fn queries_try_only_globs_sharing_a_literal() {
        let mut texts = Vec::new();
        for i in 0..2000 {
            texts.push(format!("registry.example.com/team-{i}/**"));
            texts.push(format!("ghcr.io/org{i}/app-*"));
            texts.push(format!("**/mirror-{i}/*"));
            texts.push(format!("**:release-{i}"));
            texts.push(format!("index.docker.io/library/tool{i}:1.{i}"));
        }
        texts.push("**".to_string());
        let index = GlobIndex::new(texts.iter().enumerate().map(|(i, g)| (g.as_str(), i)))
            .unwrap_or_else(|e| panic!("{e}"));
        let tried = |image: &str| index.collect(image, &mut Vec::new());
        // `**` plus the one glob each of these names.
        assert_eq!(tried("registry.example.com/team-7/a/b:1"), 2);
        assert_eq!(tried("ghcr.io/org7/app-x:1"), 2);
        assert_eq!(tried("index.docker.io/library/tool7:1.7"), 2);
        assert_eq!(tried("quay.io/mirror-7/x:1"), 2);
        assert_eq!(tried("quay.io/x/y:release-7"), 2);
        assert_eq!(tried("docker.example.org/other/app:2.0"), 1);
        assert_eq!(
            index.matching(&["quay.io/mirror-7/x:1"]),
            [7 * 5 + 2, 10_000]
        );
    }

    #[test]
    fn non_ascii_images_do_not_panic() {
        let index = index(&[("ghcr.io/**", 0), ("**", 1), ("a*", 2)]);
        assert_eq!(index.matching(&["ghcr.ioé/x"]), [1]);
        assert_eq!(index.matching(&["é"]), [1]);
        assert_eq!(index.matching(&["aé"]), [1, 2]);
    }
}
