//! Table-driven image reference parsing: `tests/fixtures/image_refs.yaml`.

use pullgate::image_ref::ImageRef;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    input: String,
    /// The input is `input` + `repeat` x `times` + `suffix`, for cases too long to write out.
    #[serde(default)]
    repeat: Option<String>,
    #[serde(default)]
    times: usize,
    #[serde(default)]
    suffix: Option<String>,

    #[serde(default)]
    registry: Option<String>,
    #[serde(default)]
    repository: Option<String>,
    /// Absent means the parsed reference must have no tag.
    #[serde(default)]
    tag: Option<String>,
    /// Absent means the parsed reference must have no digest.
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    display: Option<String>,

    /// A substring of the expected error message.
    #[serde(default)]
    error: Option<String>,
}

impl Case {
    fn full_input(&self) -> String {
        let mut s = self.input.clone();
        if let Some(unit) = &self.repeat {
            s.push_str(&unit.repeat(self.times));
        }
        if let Some(suffix) = &self.suffix {
            s.push_str(suffix);
        }
        s
    }

    fn check(&self) -> Result<(), String> {
        let input = self.full_input();
        let parsed = ImageRef::parse(&input);
        match (&self.error, parsed) {
            (Some(want), Ok(got)) => Err(format!(
                "expected error containing {want:?}, parsed as {got}"
            )),
            (Some(want), Err(e)) => {
                let msg = e.to_string();
                if !msg.contains(want.as_str()) {
                    return Err(format!("error {msg:?} does not contain {want:?}"));
                }
                // Messages name the input (shortened only when huge).
                if !input.is_empty() && input.len() <= 256 && !msg.contains(&format!("{input:?}")) {
                    return Err(format!("error {msg:?} does not name the input"));
                }
                Ok(())
            }
            (None, Err(e)) => Err(format!("unexpected error: {e}")),
            (None, Ok(got)) => {
                let (Some(registry), Some(repository), Some(display)) =
                    (&self.registry, &self.repository, &self.display)
                else {
                    return Err("a success case needs registry, repository and display".into());
                };
                let mut diffs = Vec::new();
                let mut cmp = |what: &str, got: Option<&str>, want: Option<&str>| {
                    if got != want {
                        diffs.push(format!("{what}: got {got:?}, want {want:?}"));
                    }
                };
                cmp("registry", Some(got.registry()), Some(registry));
                cmp("repository", Some(got.repository()), Some(repository));
                cmp("tag", got.tag(), self.tag.as_deref());
                cmp("digest", got.digest(), self.digest.as_deref());
                let shown = got.to_string();
                cmp("display", Some(&shown), Some(display));
                let name = got.name();
                cmp(
                    "name",
                    Some(&name),
                    Some(&format!("{registry}/{repository}")),
                );
                cmp(
                    "tag_form",
                    got.tag_form().as_deref(),
                    self.tag
                        .as_ref()
                        .map(|t| format!("{registry}/{repository}:{t}"))
                        .as_deref(),
                );
                cmp(
                    "digest_form",
                    got.digest_form().as_deref(),
                    self.digest
                        .as_ref()
                        .map(|d| format!("{registry}/{repository}@{d}"))
                        .as_deref(),
                );
                // The normalized form parses back to the same reference.
                match ImageRef::parse(&shown) {
                    Ok(again) if again == got => {}
                    Ok(again) => diffs.push(format!("reparse of {shown} gave {again}")),
                    Err(e) => diffs.push(format!("reparse of {shown} failed: {e}")),
                }
                if diffs.is_empty() {
                    Ok(())
                } else {
                    Err(diffs.join("; "))
                }
            }
        }
    }
}

#[test]
fn image_ref_table() {
    let text = std::fs::read_to_string("tests/fixtures/image_refs.yaml")
        .unwrap_or_else(|e| panic!("reading the fixture: {e}"));
    let cases: Vec<Case> =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing the fixture: {e}"));
    assert!(cases.len() >= 40, "table shrank to {} cases", cases.len());
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            case.check().err().map(|why| {
                let input = case.full_input();
                let shown: String = input.chars().take(80).collect();
                format!("{shown:?}: {why}")
            })
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
