//! Comparing plans with Pacemaker's recorded Transition Summaries (pure string work;
//! `haven conformance` reads the files).

/// The expected lines: the indented block after `Transition Summary:`.
pub fn expected_lines(summary: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in summary.lines() {
        if line.trim_end() == "Transition Summary:" {
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') && !line.starts_with('\t') {
            break;
        }
        out.push(line.to_string());
    }
    out
}

/// Normalise a summary line for comparison: whitespace collapsed, the `due to` reason
/// dropped, clone instance numbers (`rsc:3`) dropped.
pub fn normalise(line: &str) -> String {
    let mut l = line.trim().to_string();
    if let Some(i) = l.find(" due to ") {
        l.truncate(i);
    }
    let words: Vec<String> = l
        .split_whitespace()
        .map(|w| match w.rsplit_once(':') {
            Some((base, n))
                if !base.is_empty() && !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) =>
            {
                base.to_string()
            }
            _ => w.to_string(),
        })
        .collect();
    words.join(" ")
}

/// Compare multisets; returns (missing from ours, extra in ours).
pub fn compare(expected: &[String], got: &[String]) -> (Vec<String>, Vec<String>) {
    let mut exp: Vec<String> = expected.iter().map(|l| normalise(l)).collect();
    let mut ours: Vec<String> = got.iter().map(|l| normalise(l)).collect();
    exp.sort();
    ours.sort();
    let mut missing = Vec::new();
    let mut extra = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < exp.len() || j < ours.len() {
        match (exp.get(i), ours.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                missing.push(a.clone());
                i += 1;
            }
            (Some(_), Some(b)) => {
                extra.push(b.clone());
                j += 1;
            }
            (Some(a), None) => {
                missing.push(a.clone());
                i += 1;
            }
            (None, Some(b)) => {
                extra.push(b.clone());
                j += 1;
            }
            (None, None) => break,
        }
    }
    (missing, extra)
}
