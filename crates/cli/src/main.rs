//! `drover`: the server (`drover server`), the all-in-one local mode
//! (`drover up`) and the operator CLI. Parses arguments, then hands off.

mod admin;
mod approvals;
mod audit;
mod client;
mod jobs;
mod logtext;
mod ops;
mod output;
mod profile;
mod secrets;
mod serve;
mod users;
mod workflow;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use drover_server::ServerArgs;

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "Run work on a fleet of machines and watch it happen"
)]
struct Cli {
    /// Server URL [default: the profile's, else http://127.0.0.1:7070].
    #[arg(long, env = "DROVER_SERVER", global = true, value_name = "URL")]
    server: Option<String>,
    /// API or session token [default: the profile's].
    #[arg(
        long,
        env = "DROVER_TOKEN",
        global = true,
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// Trust only a server whose certificate this CA (PEM) signed [default:
    /// the profile's; else the public web roots]. `drover login` keeps it
    /// in the profile.
    #[arg(long, env = "DROVER_CA_FILE", global = true, value_name = "FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Trust only the server certificate with this fingerprint
    /// (sha256:HEX) [default: the profile's]. `drover login` keeps it in
    /// the profile.
    #[arg(
        long,
        env = "DROVER_CA_FINGERPRINT",
        global = true,
        value_name = "SHA256"
    )]
    ca_fingerprint: Option<String>,
    /// Saved profile to use.
    #[arg(
        long,
        env = "DROVER_PROFILE",
        global = true,
        default_value = "default",
        value_name = "NAME"
    )]
    profile: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control-plane server.
    Server(ServerArgs),
    /// Run a server on SQLite plus one local agent: a whole Drover in one command.
    Up(serve::UpArgs),
    /// Offline maintenance of a server's store (reset-password).
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Log in with a password and save the session in the profile.
    Login(ops::LoginArgs),
    /// Create, list and revoke tokens.
    #[command(subcommand)]
    Token(ops::TokenCommand),
    /// Work waiting for approval; approve, reject; protection rules.
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCommand),
    /// Users, their roles and scopes; passwords.
    #[command(subcommand)]
    Users(users::UsersCommand),
    /// Inspect and manage enrolled agents; drain, stop and resume them.
    #[command(subcommand)]
    Agents(ops::AgentsCommand),
    /// Fleet-wide emergency stop and resume.
    #[command(subcommand)]
    Fleet(ops::FleetCommand),
    /// Sandbox profiles (applied with drover actions apply).
    #[command(subcommand)]
    Sandboxes(jobs::SandboxesCommand),
    /// Manage the action catalog.
    #[command(subcommand)]
    Actions(jobs::ActionsCommand),
    /// Run an action on the agents a target names.
    Run(jobs::RunArgs),
    /// Inspect, follow and cancel jobs.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Durable workflows: submit a definition, follow, cancel, results, artifacts.
    #[command(subcommand)]
    Workflow(workflow::WorkflowCommand),
    /// Webhooks called when runs end, and their delivery log.
    #[command(subcommand)]
    Webhooks(workflow::WebhooksCommand),
    /// Read the audit log.
    #[command(subcommand)]
    Audit(jobs::AuditCommand),
    /// The secrets vault: set, list, rm, rotate-master-key.
    #[command(subcommand)]
    Secrets(secrets::SecretsCommand),
    /// Print the version.
    Version,
}

/// Lets `drover agents list | head` end quietly: with the default SIGPIPE
/// action the process exits when the reader goes away, as a Unix filter
/// should, instead of panicking on the failed write.
#[cfg(unix)]
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists; setting a
    // signal disposition to SIG_DFL has no other effect on Rust's runtime.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The runtime's threads (where requests are written to sockets) block
/// SIGPIPE: a server that answers early (413) and closes must give the
/// client an error to report, not kill it; stdout stays a Unix filter's.
#[cfg(unix)]
#[allow(unsafe_code)]
fn block_sigpipe_on_this_thread() {
    // SAFETY: sigset operations on a local set, and pthread_sigmask on the
    // calling thread only; no Rust invariant depends on SIGPIPE.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn main() -> ExitCode {
    #[cfg(unix)]
    restore_sigpipe();
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    #[cfg(unix)]
    builder.on_thread_start(block_sigpipe_on_this_thread);
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<jobs::JobFailed>().is_some() {
                ExitCode::from(jobs::EXIT_JOB_FAILED)
            } else if e.downcast_ref::<audit::ChainBroken>().is_some() {
                ExitCode::from(audit::EXIT_CHAIN_BROKEN)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let target = ops::Target {
        server: cli.server,
        token: cli.token,
        profile: cli.profile,
        ca_file: cli.ca_file,
        ca_fingerprint: cli.ca_fingerprint,
    };
    match cli.command {
        Command::Server(args) => serve::server(args).await,
        Command::Up(args) => serve::up(args, &target).await,
        Command::Admin(cmd) => admin::admin(cmd).await,
        Command::Login(args) => ops::login(&target, args).await,
        Command::Token(cmd) => ops::token(&target, cmd).await,
        Command::Users(cmd) => users::users(&target, cmd).await,
        Command::Approvals(cmd) => approvals::approvals(&target, cmd).await,
        Command::Agents(cmd) => ops::agents(&target, cmd).await,
        Command::Fleet(cmd) => ops::fleet(&target, cmd).await,
        Command::Sandboxes(cmd) => jobs::sandboxes(&target, cmd).await,
        Command::Actions(cmd) => jobs::actions(&target, cmd).await,
        Command::Run(args) => jobs::run(&target, args).await,
        Command::Jobs(cmd) => jobs::jobs(&target, cmd).await,
        Command::Audit(cmd) => jobs::audit(&target, cmd).await,
        Command::Workflow(cmd) => workflow::workflow(&target, cmd).await,
        Command::Webhooks(cmd) => workflow::webhooks(&target, cmd).await,
        Command::Secrets(cmd) => secrets::secrets(&target, cmd).await,
        Command::Version => {
            println!("drover {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
