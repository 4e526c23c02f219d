//! `haven import pacemaker CIB.xml`: a Pacemaker CIB becomes Haven's configuration
//! (TOML) and observed state (JSON). What cannot be expressed is listed on stderr.

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub from: From,
}

#[derive(clap::Subcommand)]
pub enum From {
    /// Import a Pacemaker CIB (cibadmin -Q output, or a scheduler input file)
    Pacemaker {
        /// The CIB XML file
        cib: PathBuf,
        /// Write the configuration here (default: print it)
        #[arg(long)]
        out_config: Option<PathBuf>,
        /// Write the observed state here
        #[arg(long)]
        out_state: Option<PathBuf>,
    },
}

/// Read and import a CIB file, with errors that name it.
pub fn load_cib(path: &std::path::Path) -> anyhow::Result<haven_model::cib::Imported> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(haven_model::cib::import(
        &path.display().to_string(),
        &text,
    )?)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let From::Pacemaker {
        cib,
        out_config,
        out_state,
    } = args.from;
    let imported = load_cib(&cib)?;
    for u in &imported.unsupported {
        eprintln!(
            "haven: not imported: <{} id=\"{}\">: {}",
            u.element, u.id, u.reason
        );
    }
    let toml = imported.config.to_toml()?;
    match out_config {
        Some(p) => {
            std::fs::write(&p, toml).with_context(|| format!("cannot write {}", p.display()))?
        }
        None => print!("{toml}"),
    }
    if let Some(p) = out_state {
        std::fs::write(&p, imported.state.to_json())
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
