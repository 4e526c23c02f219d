//! `haven conformance pacemaker DIR`: Pacemaker's scheduler regression cases through
//! Haven's import and scheduler, compared by their Transition Summary lines.

use std::path::{Path, PathBuf};

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub suite: Suite,
}

#[derive(clap::Subcommand)]
pub enum Suite {
    /// Every NAME.xml with a NAME.summary in DIR
    Pacemaker {
        dir: PathBuf,
        /// Only cases whose name contains this
        #[arg(long)]
        only: Option<String>,
    },
}

use haven_sched::conformance::{compare, expected_lines};

fn run_case(xml: &Path, summary: &Path) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let text = std::fs::read_to_string(summary)
        .with_context(|| format!("cannot read {}", summary.display()))?;
    let expected = expected_lines(&text);
    let imported = crate::cmd::import::load_cib(xml)?;
    let plan = haven_sched::schedule(&imported.config, &imported.state);
    Ok(compare(&expected, &plan.transition_summary()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Suite::Pacemaker { dir, only } = args.suite;
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".xml"))
                .map(str::to_string)
        })
        .filter(|n| dir.join(format!("{n}.summary")).exists())
        .filter(|n| only.as_deref().is_none_or(|o| n.contains(o)))
        .collect();
    names.sort();
    let (mut passed, mut failed) = (0usize, 0usize);
    for name in names {
        let xml = dir.join(format!("{name}.xml"));
        let summary = dir.join(format!("{name}.summary"));
        match run_case(&xml, &summary) {
            Ok((missing, extra)) if missing.is_empty() && extra.is_empty() => {
                passed += 1;
                println!("PASS {name}");
            }
            Ok((missing, extra)) => {
                failed += 1;
                println!("FAIL {name}");
                for m in missing.iter().take(6) {
                    println!("  - {m}");
                }
                for e in extra.iter().take(6) {
                    println!("  + {e}");
                }
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {name}");
                println!("  ! {e:#}");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(())
}
