//! Pacemaker's scheduler regression cases (read from ../shared, never copied here) run
//! through `haven conformance pacemaker`; the pass count must not fall below the floor
//! kept in crates/haven-sched/conformance-floor.txt.

use std::path::PathBuf;
use std::process::Command;

fn cases_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/pacemaker/cases")
}

#[test]
fn pass_count_stays_above_the_floor() {
    let floor_file =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../haven-sched/conformance-floor.txt");
    let floor: usize = std::fs::read_to_string(&floor_file)
        .expect("floor file is in the repo")
        .trim()
        .parse()
        .expect("floor is a number");
    let dir = cases_dir();
    assert!(
        dir.is_dir(),
        "conformance cases missing at {}",
        dir.display()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["conformance", "pacemaker"])
        .arg(&dir)
        .output()
        .expect("haven runs");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let (passed, failed) = parse_totals(last).unwrap_or_else(|| panic!("bad last line: {last:?}"));
    let per_case = stdout
        .lines()
        .filter(|l| l.starts_with("PASS ") || l.starts_with("FAIL "))
        .count();
    assert_eq!(per_case, passed + failed, "one line per case");
    let cases = std::fs::read_dir(&dir)
        .expect("readable")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".summary"))
        .count();
    assert_eq!(per_case, cases, "every case with a summary was run");
    assert!(
        passed >= floor,
        "{passed} passed, below the floor of {floor}"
    );
}

fn parse_totals(line: &str) -> Option<(usize, usize)> {
    let (p, rest) = line.split_once(" passed, ")?;
    let f = rest.strip_suffix(" failed")?;
    Some((p.parse().ok()?, f.parse().ok()?))
}

#[test]
fn a_failing_case_prints_its_difference() {
    // A case directory with one case whose expected summary is wrong on purpose.
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = cases_dir().join("simple2.xml");
    std::fs::copy(&src, tmp.path().join("x.xml")).expect("copy input");
    std::fs::write(
        tmp.path().join("x.summary"),
        "Transition Summary:\n  * Start      nothing-like-this     ( nowhere )\n\nExecuting Cluster Transition:\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["conformance", "pacemaker"])
        .arg(tmp.path())
        .output()
        .expect("haven runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAIL x"), "{stdout}");
    assert!(
        stdout.contains("  - * Start nothing-like-this ( nowhere )"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().last(), Some("0 passed, 1 failed"));
}
