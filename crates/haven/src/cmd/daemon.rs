use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The node's directory (made by `haven cluster init` or `haven cluster join`)
    #[arg(long)]
    pub dir: PathBuf,
    /// Run as a witness: vote in the Raft group, run no resources
    #[arg(long)]
    pub witness: bool,
    /// A lab node: enables the lab's fault switches and `lab` fence devices
    #[arg(long, hide = true)]
    pub lab: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HAVEN_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    "info,openraft=warn,openraft::replication=off,openraft::engine=error",
                )
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(crate::daemon::run(&args.dir, args.witness, args.lab))
}
