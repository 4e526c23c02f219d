//! `haven`: the one binary. `haven daemon` runs a node; every other subcommand is a
//! client of the cluster or a local tool.

mod cmd;
mod daemon;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "haven",
    version,
    about = "A high-availability cluster for virtual machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the scheduler on a configuration and state (or a Pacemaker CIB) and print the plan
    Simulate(cmd::simulate::Args),
    /// Convert another cluster manager's configuration into Haven's
    Import(cmd::import::Args),
    /// Run conformance suites (Pacemaker's scheduler regression cases)
    Conformance(cmd::conformance::Args),
    /// Benchmarks, each beside the peer it competes with
    Bench(cmd::bench::Args),
    /// Replicated volumes
    Volume(cmd::volume::Args),
    /// Run this host's daemon
    Daemon(cmd::daemon::Args),
    /// Create, join and inspect the cluster
    Cluster(cmd::cluster::Args),
    /// Show, validate and apply the cluster configuration
    Config(cmd::config::Args),
    /// Show the cluster: nodes, quorum, resources
    Status(cmd::status::Args),
    /// A local lab cluster on this machine
    Lab(cmd::lab::Args),
    /// Put a node in standby or maintenance, or back online
    Node(daemon::node_cmd::Args),
    /// Start, stop, move or clean up a resource
    Resource(daemon::resource_cmd::Args),
    /// Fencing: members and victims, fence a node, acknowledge by hand, history
    Fence(cmd::fence::Args),
    /// Serve the REST API and web dashboard on loopback, with this client's certificate
    Dashboard(cmd::dashboard::Args),
}

/// Rust ignores SIGPIPE, so `haven simulate ... | head` would panic on the closed pipe
/// in `println!`. A report-printing tool should just end there, as C tools do.
#[allow(unsafe_code)]
fn restore_default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called first thing in main, before any thread or runtime exists, and
    // SIG_DFL installs no Rust handler, so nothing can observe a half-set disposition.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Only for the local tools that print long reports. Never for anything that talks
    // over sockets (the daemon above all): with SIGPIPE's default, a write to a peer
    // that went away would kill the process silently instead of returning EPIPE.
    if matches!(
        cli.command,
        Command::Simulate(_) | Command::Import(_) | Command::Conformance(_)
    ) {
        restore_default_sigpipe();
    }
    let result = match cli.command {
        Command::Simulate(a) => cmd::simulate::run(a),
        Command::Import(a) => cmd::import::run(a),
        Command::Conformance(a) => cmd::conformance::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Volume(a) => cmd::volume::run(a),
        Command::Daemon(a) => cmd::daemon::run(a),
        Command::Cluster(a) => cmd::cluster::run(a),
        Command::Config(a) => cmd::config::run(a),
        Command::Status(a) => cmd::status::run(a),
        Command::Lab(a) => cmd::lab::run(a),
        Command::Node(a) => daemon::node_cmd::run(a),
        Command::Resource(a) => daemon::resource_cmd::run(a),
        Command::Fence(a) => cmd::fence::run(a),
        Command::Dashboard(a) => cmd::dashboard::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line: file, field, reason.
            eprintln!("haven: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
