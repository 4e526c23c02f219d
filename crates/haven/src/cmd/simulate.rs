//! `haven simulate`: run the scheduler on a configuration and state (or a Pacemaker CIB)
//! and print the plan as Pacemaker's "Transition Summary".

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    /// A Pacemaker CIB (configuration and status)
    #[arg(long, conflicts_with_all = ["config", "state"])]
    pub cib: Option<PathBuf>,
    /// Haven configuration (TOML)
    #[arg(long, requires = "state")]
    pub config: Option<PathBuf>,
    /// Observed state (JSON)
    #[arg(long, requires = "config")]
    pub state: Option<PathBuf>,
    /// Print the plan graph as JSON
    #[arg(long)]
    pub json: bool,
    /// Print allocation scores
    #[arg(long)]
    pub scores: bool,
}

/// Load the inputs named by the arguments.
pub fn load(args: &Args) -> anyhow::Result<(haven_model::Config, haven_model::State)> {
    if let Some(cib) = &args.cib {
        let imported = crate::cmd::import::load_cib(cib)?;
        return Ok((imported.config, imported.state));
    }
    let (Some(c), Some(s)) = (&args.config, &args.state) else {
        anyhow::bail!("give --cib FILE, or --config FILE and --state FILE");
    };
    let ctext =
        std::fs::read_to_string(c).with_context(|| format!("cannot read {}", c.display()))?;
    let config = haven_model::Config::from_toml(&c.display().to_string(), &ctext)?;
    let stext =
        std::fs::read_to_string(s).with_context(|| format!("cannot read {}", s.display()))?;
    let state = haven_model::State::from_json(&s.display().to_string(), &stext)?;
    Ok((config, state))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (config, state) = load(&args)?;
    let plan = haven_sched::schedule(&config, &state);
    if args.json {
        println!("{}", plan.to_json());
        return Ok(());
    }
    if args.scores {
        println!("Allocation scores:");
        for l in plan.score_lines() {
            println!("  {l}");
        }
        println!();
    }
    println!("Transition Summary:");
    for l in plan.transition_summary() {
        println!("{l}");
    }
    Ok(())
}
