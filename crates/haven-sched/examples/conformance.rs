//! Developer tool: the Pacemaker conformance run without building the whole binary.
//! `cargo run -p haven-sched --example conformance -- DIR [FILTER]`

use haven_sched::conformance::{compare, expected_lines};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        eprintln!("usage: conformance DIR [FILTER]");
        std::process::exit(2);
    };
    let filter = args.next();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".xml"))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    names.retain(|n| filter.as_deref().is_none_or(|f| n.contains(f)));
    names.sort();
    let (mut pass, mut fail) = (0, 0);
    for name in names {
        let (Ok(xml), Ok(sum)) = (
            std::fs::read_to_string(format!("{dir}/{name}.xml")),
            std::fs::read_to_string(format!("{dir}/{name}.summary")),
        ) else {
            continue;
        };
        match haven_model::cib::import(&name, &xml) {
            Err(e) => {
                fail += 1;
                println!("FAIL {name}\n  ! {e}");
            }
            Ok(imp) => {
                let plan = haven_sched::schedule(&imp.config, &imp.state);
                let (missing, extra) = compare(&expected_lines(&sum), &plan.transition_summary());
                if missing.is_empty() && extra.is_empty() {
                    pass += 1;
                    println!("PASS {name}");
                } else {
                    fail += 1;
                    println!("FAIL {name}");
                    for m in &missing {
                        println!("  - {m}");
                    }
                    for e in &extra {
                        println!("  + {e}");
                    }
                }
            }
        }
    }
    println!("{pass} passed, {fail} failed");
}
