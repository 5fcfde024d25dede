//! Messages in the shape policy-controller's users know: knative's `apis.FieldError`.
//!
//! Each problem is `<message>: <path>[, <path>…]`, followed by its details on the next line
//! when it has any. Problems with the same message and details are merged into one (their paths
//! sorted and joined with `", "`), the list is sorted by message then details, and the problems
//! are joined with newlines. policy-controller prefixes the whole with `validation failed: `.

/// One problem at one or more field paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub message: String,
    pub paths: Vec<String>,
    /// Longer payload shown on the line after `message: paths` (empty: none).
    pub details: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.message, self.paths.join(", "))?;
        if !self.details.is_empty() {
            write!(f, "\n{}", self.details)?;
        }
        Ok(())
    }
}

/// A collection of problems, rendered as knative renders `FieldError.Error()`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldErrors(Vec<FieldError>);

impl FieldErrors {
    pub fn push(
        &mut self,
        message: impl Into<String>,
        path: impl Into<String>,
        details: impl Into<String>,
    ) {
        self.0.push(FieldError {
            message: message.into(),
            paths: vec![path.into()],
            details: details.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Problems with equal message and details merged, paths de-duplicated and sorted, the
    /// list sorted by message then details (knative's `merge`).
    pub fn merged(&self) -> Vec<FieldError> {
        let mut out: Vec<FieldError> = Vec::new();
        for e in &self.0 {
            match out
                .iter_mut()
                .find(|m| m.message == e.message && m.details == e.details)
            {
                Some(m) => {
                    for p in &e.paths {
                        if !m.paths.contains(p) {
                            m.paths.push(p.clone());
                        }
                    }
                }
                None => out.push(e.clone()),
            }
        }
        for e in &mut out {
            e.paths.sort();
        }
        out.sort_by(|a, b| (&a.message, &a.details).cmp(&(&b.message, &b.details)));
        out
    }

    /// Every merged problem, one string each (as admission warnings are listed).
    pub fn to_list(&self) -> Vec<String> {
        self.merged().iter().map(ToString::to_string).collect()
    }
}

impl std::fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_list().join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_knative() {
        let mut errs = FieldErrors::default();
        errs.push(
            "no matching policies",
            "spec.containers[1].image",
            "quay.io/b",
        );
        errs.push(
            "failed policy: p",
            "spec.containers[0].image",
            "ghcr.io/a x",
        );
        errs.push(
            "failed policy: p",
            "spec.initContainers[0].image",
            "ghcr.io/a x",
        );
        errs.push(
            "failed policy: p",
            "spec.containers[0].image",
            "ghcr.io/a x",
        );
        errs.push("missing", "spec.x", "");
        assert_eq!(
            errs.to_string(),
            "failed policy: p: spec.containers[0].image, spec.initContainers[0].image\n\
             ghcr.io/a x\n\
             missing: spec.x\n\
             no matching policies: spec.containers[1].image\n\
             quay.io/b"
        );
        assert_eq!(errs.to_list().len(), 3);
    }
}
