//! Table-driven ClusterImagePolicy glob matching: `tests/fixtures/globs.yaml`.

use pullgate::policy::glob::{validate_glob, Glob, GlobIndex};

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    #[serde(default)]
    glob: Option<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    matches: Option<bool>,
    #[serde(default)]
    error: Option<String>,

    #[serde(default)]
    index: Option<Vec<Entry>>,
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    owners: Vec<usize>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    glob: String,
    owner: usize,
}

fn check_match(glob: &str, image: &str, want: bool) -> Result<(), String> {
    validate_glob(glob).map_err(|e| format!("validate_glob: {e}"))?;
    let compiled = Glob::new(glob).map_err(|e| format!("Glob::new: {e}"))?;
    if compiled.as_str() != glob {
        return Err(format!("as_str gave {:?}", compiled.as_str()));
    }
    let got = compiled.matches(image);
    if got != want {
        return Err(format!("Glob::matches gave {got}, want {want}"));
    }
    let index = GlobIndex::new([(glob, 7)]).map_err(|e| format!("GlobIndex::new: {e}"))?;
    let owners = index.matching(&[image]);
    let expected: Vec<usize> = if want { vec![7] } else { vec![] };
    if owners != expected {
        return Err(format!(
            "GlobIndex::matching gave {owners:?}, want {expected:?}"
        ));
    }
    Ok(())
}

fn check_error(glob: &str, want: &str) -> Result<(), String> {
    let messages = [
        validate_glob(glob).err().map(|e| e.to_string()),
        Glob::new(glob).err().map(|e| e.to_string()),
        GlobIndex::new([("ok/**", 0), (glob, 1)])
            .err()
            .map(|e| e.to_string()),
    ];
    for (what, msg) in ["validate_glob", "Glob::new", "GlobIndex::new"]
        .iter()
        .zip(messages)
    {
        match msg {
            None => return Err(format!("{what} accepted it")),
            Some(msg) if !msg.contains(want) => {
                return Err(format!("{what}: {msg:?} does not contain {want:?}"))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn check_index(entries: &[Entry], images: &[String], want: &[usize]) -> Result<(), String> {
    let index = GlobIndex::new(entries.iter().map(|e| (e.glob.as_str(), e.owner)))
        .map_err(|e| format!("GlobIndex::new: {e}"))?;
    if index.len() != entries.len() || index.is_empty() != entries.is_empty() {
        return Err(format!("len {} for {} entries", index.len(), entries.len()));
    }
    let images: Vec<&str> = images.iter().map(String::as_str).collect();
    let got = index.matching(&images);
    if got != want {
        return Err(format!("matching gave {got:?}, want {want:?}"));
    }
    Ok(())
}

impl Case {
    fn describe(&self) -> String {
        match (&self.glob, &self.image, &self.index) {
            (Some(g), Some(i), _) => format!("glob {g:?} image {i:?}"),
            (Some(g), None, _) => format!("glob {g:?}"),
            (_, _, Some(entries)) => {
                format!("index of {} globs, images {:?}", entries.len(), self.images)
            }
            _ => "malformed case".to_string(),
        }
    }

    fn check(&self) -> Result<(), String> {
        match (
            &self.glob,
            &self.image,
            self.matches,
            &self.error,
            &self.index,
        ) {
            (Some(glob), Some(image), Some(want), None, None) => check_match(glob, image, want),
            (Some(glob), None, None, Some(want), None) => check_error(glob, want),
            (None, None, None, None, Some(entries)) => {
                check_index(entries, &self.images, &self.owners)
            }
            _ => Err(
                "a case is {glob, image, matches}, {glob, error} or {index, images, owners}".into(),
            ),
        }
    }
}

#[test]
fn glob_table() {
    let text = std::fs::read_to_string("tests/fixtures/globs.yaml")
        .unwrap_or_else(|e| panic!("reading the fixture: {e}"));
    let cases: Vec<Case> =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing the fixture: {e}"));
    assert!(cases.len() >= 40, "table shrank to {} cases", cases.len());
    assert!(cases.iter().any(|c| c.index.is_some()), "no GlobIndex case");
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            c.check()
                .err()
                .map(|why| format!("{}: {why}", c.describe()))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
