use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use crate::daemon::api;
use crate::daemon::client::Client;
use crate::daemon::protocol::{ApplyConfig, ConfigReply, Empty};

#[derive(clap::Args)]
pub struct Args {
    /// client.toml (default: $HAVEN_CONFIG)
    #[arg(long, env = "HAVEN_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Print the cluster's configuration (its version first, as a comment)
    Show,
    /// Check a configuration file without applying it
    Validate { file: PathBuf },
    /// Show how a file differs from the cluster's configuration
    Diff { file: PathBuf },
    /// Apply a file. It replaces the configuration only if the cluster is still at the
    /// version it was based on (--based-on, or the `# version N` line `show` printed)
    Apply {
        file: PathBuf,
        #[arg(long)]
        based_on: Option<u64>,
    },
}

const VERSION_PREFIX: &str = "# haven-config-version: ";

fn read(file: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("{}: cannot read", file.display()))
}

fn validate(file: &std::path::Path, text: &str) -> anyhow::Result<()> {
    haven_model::Config::from_toml(&file.display().to_string(), text)?;
    Ok(())
}

/// The version a file says it was based on: the first line `show` writes.
fn based_on_in(text: &str) -> Option<u64> {
    text.lines()
        .next()
        .and_then(|l| l.strip_prefix(VERSION_PREFIX))
        .and_then(|v| v.trim().parse().ok())
}

fn strip_version_line(text: &str) -> &str {
    if based_on_in(text).is_some() {
        text.split_once('\n').map(|(_, rest)| rest).unwrap_or("")
    } else {
        text
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    match args.command {
        Command::Validate { file } => {
            let text = read(&file)?;
            validate(&file, &text)?;
            println!("{}: valid", file.display());
            Ok(())
        }
        Command::Show => {
            let c: ConfigReply = rt.block_on(async {
                Client::from_arg(args.config)?
                    .call(api::CONFIG, &Empty {})
                    .await
            })?;
            print!("{VERSION_PREFIX}{}\n{}", c.version, c.text);
            Ok(())
        }
        Command::Diff { file } => {
            let text = read(&file)?;
            let c: ConfigReply = rt.block_on(async {
                Client::from_arg(args.config)?
                    .call(api::CONFIG, &Empty {})
                    .await
            })?;
            print!(
                "{}",
                line_diff(&c.text, strip_version_line(&text), c.version, &file)
            );
            Ok(())
        }
        Command::Apply { file, based_on } => {
            let text = read(&file)?;
            let based_on = based_on.or_else(|| based_on_in(&text)).with_context(|| {
                format!(
                    "{}: which version is this change based on? Give --based-on N, or start from `haven config show` output, whose first line records it",
                    file.display()
                )
            })?;
            let body = strip_version_line(&text).to_string();
            validate(&file, &body)?;
            let c: ConfigReply = rt.block_on(async {
                Client::from_arg(args.config)?
                    .call(
                        api::CONFIG_APPLY,
                        &ApplyConfig {
                            based_on,
                            text: body,
                        },
                    )
                    .await
            })?;
            println!("applied: configuration version {}", c.version);
            Ok(())
        }
    }
}

/// A minimal line diff (longest common subsequence), enough to review a change.
fn line_diff(old: &str, new: &str, version: u64, file: &std::path::Path) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = format!("--- cluster (version {version})\n+++ {}\n", file.display());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("+{}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("-{}\n", a[i]));
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_line_from_show_is_read_back() {
        let text = format!("{VERSION_PREFIX}7\n[options]\n");
        assert_eq!(based_on_in(&text), Some(7));
        assert_eq!(strip_version_line(&text), "[options]\n");
        assert_eq!(based_on_in("[options]\n"), None);
    }

    #[test]
    fn diff_marks_removed_and_added_lines() {
        let d = line_diff("a\nb\nc\n", "a\nc\nd\n", 3, std::path::Path::new("f"));
        assert!(
            d.contains("-b\n") && d.contains("+d\n") && !d.contains("+a"),
            "{d}"
        );
    }
}
