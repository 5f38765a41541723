//! `drover`: the server (`drover server`), the all-in-one local mode
//! (`drover up`) and the operator CLI. Parses arguments, then hands off.

mod admin;
mod approvals;
mod audit;
mod client;
mod docs;
mod jobs;
mod logtext;
mod ops;
mod output;
mod profile;
mod schedules;
mod scripts;
mod secrets;
mod serve;
mod users;
mod workflow;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use drover_server::ServerArgs;

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "Run work on a fleet of machines and watch it happen"
)]
struct Cli {
    #[command(flatten)]
    client: RootClientArgs,
    #[command(subcommand)]
    command: Command,
}

/// The client flags given before the subcommand (`drover --server URL
/// agents list`): command line only, so that `drover server` and `drover
/// up` can refuse them; their variables belong to the client commands.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Client options (also after the subcommand)")]
struct RootClientArgs {
    /// Server URL (http[s]://HOST:PORT; HOST:PORT means http) [default: the
    /// profile's, else http://127.0.0.1:7070].
    #[arg(long = "server", id = "root_server", value_name = "URL")]
    server: Option<String>,
    /// API or session token [default: the profile's].
    #[arg(long = "token", id = "root_token", value_name = "TOKEN")]
    token: Option<String>,
    /// Trust only a server whose certificate this CA (PEM) signed.
    #[arg(long = "ca-file", id = "root_ca_file", value_name = "FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Trust only the server certificate with this fingerprint (sha256:HEX).
    #[arg(
        long = "ca-fingerprint",
        id = "root_ca_fingerprint",
        value_name = "SHA256"
    )]
    ca_fingerprint: Option<String>,
    /// Saved profile to use [default: default].
    #[arg(long = "profile", id = "root_profile", value_name = "NAME")]
    profile: Option<String>,
}

/// How a client command reaches its server: these flags (before or after
/// the subcommand), else their variables, else the saved profile.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Client options")]
struct ClientArgs {
    /// Server URL (http[s]://HOST:PORT; HOST:PORT means http) [default: the
    /// profile's, else http://127.0.0.1:7070].
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
    /// Saved profile to use (see ~/.config/drover/cli.toml) [default:
    /// default].
    #[arg(long, env = "DROVER_PROFILE", global = true, value_name = "NAME")]
    profile: Option<String>,
}

impl ClientArgs {
    /// The target of a client command: flags given before the subcommand
    /// win, then those after it or their variables.
    fn target(self, root: &RootClientArgs) -> ops::Target {
        let given = root.profile.clone().or(self.profile);
        ops::Target {
            server: root.server.clone().or(self.server),
            token: root.token.clone().or(self.token),
            profile: given
                .clone()
                .unwrap_or_else(|| ops::DEFAULT_PROFILE.to_owned()),
            profile_given: given.is_some(),
            ca_file: root.ca_file.clone().or(self.ca_file),
            ca_fingerprint: root.ca_fingerprint.clone().or(self.ca_fingerprint),
        }
    }
}

/// A client command made of subcommands, with the client flags.
#[derive(Debug, clap::Args)]
struct Client<C: clap::Subcommand> {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: C,
}

/// A client command with arguments of its own, with the client flags.
#[derive(Debug, clap::Args)]
struct ClientWith<A: clap::Args> {
    // The command's own arguments first: the client flags' help heading
    // would otherwise carry over to them.
    #[command(flatten)]
    args: A,
    #[command(flatten)]
    client: ClientArgs,
}

/// Client flags given after `drover server` or `drover up`: parsed only
/// to be refused by name, and hidden from their help.
#[derive(Debug, Clone, Default, clap::Args)]
struct StrayClientFlags {
    #[arg(long = "server", id = "stray_server", hide = true)]
    server: Option<String>,
    #[arg(long = "token", id = "stray_token", hide = true)]
    token: Option<String>,
    #[arg(long = "ca-file", id = "stray_ca_file", hide = true)]
    ca_file: Option<String>,
    #[arg(long = "ca-fingerprint", id = "stray_ca_fingerprint", hide = true)]
    ca_fingerprint: Option<String>,
}

/// `drover server`: the server's flags.
#[derive(Debug, clap::Args)]
struct ServerCommand {
    #[command(flatten)]
    args: ServerArgs,
    #[command(flatten)]
    stray: StrayClientFlags,
    #[arg(long = "profile", id = "stray_profile", hide = true)]
    profile: Option<String>,
}

/// `drover up`: the server's flags, and the profile it saves.
#[derive(Debug, clap::Args)]
struct UpCommand {
    #[command(flatten)]
    up: serve::UpArgs,
    /// The CLI profile to save this server in [default: default].
    #[arg(long, env = "DROVER_PROFILE", value_name = "NAME")]
    profile: Option<String>,
    #[command(flatten)]
    stray: StrayClientFlags,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control-plane server.
    Server(ServerCommand),
    /// Run a server on SQLite plus one local agent: a whole Drover in one command.
    Up(UpCommand),
    /// Offline maintenance of a server's store (reset-password).
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Log in with a password and save the session in the profile.
    Login(ClientWith<ops::LoginArgs>),
    /// Log out: end the profile's session on the server and forget its token.
    Logout(ClientWith<ops::LogoutArgs>),
    /// Show who the token acts as: server, profile, user, role, scope, token.
    Whoami(ClientWith<ops::WhoamiArgs>),
    /// Create, list and revoke tokens.
    Token(Client<ops::TokenCommand>),
    /// Work waiting for approval; approve, reject; protection rules.
    Approvals(Client<approvals::ApprovalsCommand>),
    /// Users, their roles and scopes; passwords.
    Users(Client<users::UsersCommand>),
    /// Inspect and manage enrolled agents; drain, stop and resume them.
    Agents(Client<ops::AgentsCommand>),
    /// Fleet-wide emergency stop and resume.
    Fleet(Client<ops::FleetCommand>),
    /// Sandbox profiles (applied with drover actions apply).
    Sandboxes(Client<jobs::SandboxesCommand>),
    /// Manage the action catalog.
    Actions(Client<jobs::ActionsCommand>),
    /// Run an action on the agents a target names.
    Run(ClientWith<jobs::RunArgs>),
    /// Inspect, follow and cancel jobs.
    Jobs(Client<jobs::JobsCommand>),
    /// Durable workflows: submit a definition, follow, cancel, results, artifacts.
    Workflow(Client<workflow::WorkflowCommand>),
    /// Webhooks called when runs end, and their delivery log.
    Webhooks(Client<workflow::WebhooksCommand>),
    /// Read the audit log.
    Audit(Client<jobs::AuditCommand>),
    /// The secrets vault: set, list, rm, rotate-master-key.
    Secrets(Client<secrets::SecretsCommand>),
    /// The scripts library: add, list, show and diff versions.
    Scripts(Client<scripts::ScriptsCommand>),
    /// Server-side schedules: start an action or a workflow on a cron
    /// clock; add, list, show, pause, resume, rm.
    Schedules(Client<schedules::SchedulesCommand>),
    /// Print a shell completion script: drover completions bash > /etc/bash_completion.d/drover.
    Completions(docs::CompletionsArgs),
    /// Write man pages (drover.1 and one per subcommand) into a directory.
    Man(docs::ManArgs),
    /// Print the version.
    Version,
}

/// The help of every `-o/--output` flag, said once here rather than at
/// each of them.
const OUTPUT_HELP: &str = "Output format: text for people, json for scripts";

/// The whole command line, as parsed, shown by `--help` and written into
/// completions and man pages.
fn command() -> clap::Command {
    fn describe_output(cmd: clap::Command) -> clap::Command {
        let cmd = cmd.mut_subcommands(describe_output);
        let undescribed = cmd
            .get_arguments()
            .any(|a| a.get_id() == "output" && a.get_help().is_none());
        if undescribed {
            cmd.mut_arg("output", |a| a.help(OUTPUT_HELP))
        } else {
            cmd
        }
    }
    describe_output(Cli::command())
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
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
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
    let root = cli.client;
    match cli.command {
        Command::Server(cmd) => {
            let profile = root.profile.is_some() || cmd.profile.is_some();
            refuse_client_flags("server", &root, &cmd.stray, profile)?;
            serve::server(cmd.args).await
        }
        Command::Up(cmd) => {
            refuse_client_flags("up", &root, &cmd.stray, false)?;
            let client = ClientArgs {
                profile: cmd.profile,
                ..ClientArgs::default()
            };
            serve::up(cmd.up, &client.target(&root)).await
        }
        Command::Admin(cmd) => {
            refuse_client_flags(
                "admin",
                &root,
                &StrayClientFlags::default(),
                root.profile.is_some(),
            )?;
            admin::admin(cmd).await
        }
        Command::Login(c) => ops::login(&c.client.target(&root), c.args).await,
        Command::Logout(c) => ops::logout(&c.client.target(&root), c.args).await,
        Command::Whoami(c) => ops::whoami(&c.client.target(&root), c.args).await,
        Command::Token(c) => ops::token(&c.client.target(&root), c.command).await,
        Command::Users(c) => users::users(&c.client.target(&root), c.command).await,
        Command::Approvals(c) => approvals::approvals(&c.client.target(&root), c.command).await,
        Command::Agents(c) => ops::agents(&c.client.target(&root), c.command).await,
        Command::Fleet(c) => ops::fleet(&c.client.target(&root), c.command).await,
        Command::Sandboxes(c) => jobs::sandboxes(&c.client.target(&root), c.command).await,
        Command::Actions(c) => jobs::actions(&c.client.target(&root), c.command).await,
        Command::Run(c) => jobs::run(&c.client.target(&root), c.args).await,
        Command::Jobs(c) => jobs::jobs(&c.client.target(&root), c.command).await,
        Command::Audit(c) => jobs::audit(&c.client.target(&root), c.command).await,
        Command::Workflow(c) => workflow::workflow(&c.client.target(&root), c.command).await,
        Command::Webhooks(c) => workflow::webhooks(&c.client.target(&root), c.command).await,
        Command::Secrets(c) => secrets::secrets(&c.client.target(&root), c.command).await,
        Command::Scripts(c) => scripts::scripts(&c.client.target(&root), c.command).await,
        Command::Schedules(c) => schedules::schedules(&c.client.target(&root), c.command).await,
        Command::Completions(args) => docs::completions(&mut command(), args),
        Command::Man(args) => docs::man(command(), args),
        Command::Version => {
            println!("drover {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

/// `drover server` and `drover up` talk to no server: a client flag given
/// to them is a mistake to point out, not to ignore (`up` saves a profile,
/// so it takes `--profile`).
fn refuse_client_flags(
    command: &str,
    root: &RootClientArgs,
    after: &StrayClientFlags,
    profile: bool,
) -> anyhow::Result<()> {
    let given = [
        ("--server", root.server.is_some() || after.server.is_some()),
        ("--token", root.token.is_some() || after.token.is_some()),
        (
            "--ca-file",
            root.ca_file.is_some() || after.ca_file.is_some(),
        ),
        (
            "--ca-fingerprint",
            root.ca_fingerprint.is_some() || after.ca_fingerprint.is_some(),
        ),
        ("--profile", profile),
    ];
    if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
        anyhow::bail!(
            "{flag} is a client flag: drover {command} does not use it (see drover {command} --help)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_argument_and_subcommand_has_help() {
        let mut command = command();
        command.build();
        let found = drover_agent::help::undocumented(&command);
        assert!(
            found.is_empty(),
            "without a description (add a /// doc comment):\n  {}",
            found.join("\n  ")
        );
    }

    /// Only the client flags sit under the "Client options" heading (a
    /// heading carries over to the arguments flattened after it).
    #[test]
    fn only_client_flags_are_headed_client_options() {
        fn walk(command: &clap::Command, path: &str, found: &mut Vec<String>) {
            let client = [
                "server",
                "token",
                "ca_file",
                "ca_fingerprint",
                "profile",
                "root_server",
                "root_token",
                "root_ca_file",
                "root_ca_fingerprint",
                "root_profile",
            ];
            for arg in command.get_arguments() {
                let headed = arg
                    .get_help_heading()
                    .is_some_and(|h| h.starts_with("Client options"));
                if headed && !client.contains(&arg.get_id().as_str()) {
                    found.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), found);
            }
        }
        let mut command = command();
        command.build();
        let mut found = Vec::new();
        walk(&command, "drover", &mut found);
        assert!(found.is_empty(), "under Client options: {found:?}");
    }

    #[test]
    fn the_command_tree_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn server_and_up_show_no_client_flags() {
        let mut command = command();
        command.build();
        for name in ["server", "up"] {
            let sub = command.find_subcommand(name).map(|s| {
                s.get_arguments()
                    .filter(|a| !a.is_hide_set())
                    .filter_map(|a| a.get_long().map(str::to_owned))
                    .collect::<Vec<_>>()
            });
            let longs = sub.unwrap_or_default();
            assert!(!longs.is_empty(), "{name} has flags");
            for client in ["server", "token", "ca-file", "ca-fingerprint"] {
                assert!(!longs.iter().any(|l| l == client), "{name} --{client}");
            }
        }
        let agents = command
            .find_subcommand("agents")
            .and_then(|a| a.find_subcommand("list"));
        let longs: Vec<&str> = agents
            .map(|l| l.get_arguments().filter_map(|a| a.get_long()).collect())
            .unwrap_or_default();
        for client in ["server", "token", "ca-file", "ca-fingerprint", "profile"] {
            assert!(longs.contains(&client), "agents list --{client}: {longs:?}");
        }
    }
}
