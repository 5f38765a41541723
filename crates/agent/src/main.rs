//! `drover-agent`: enroll, run, status, version.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use drover_agent::config::LogFormat;
use drover_agent::outbox::Outbox;
use drover_agent::state::StateDir;
use drover_agent::{AgentArgs, AgentConfig, EnrollOptions, Error, RunOptions};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Exit status when the server refused the credentials for good; a service
/// manager should not restart the agent on it (RestartPreventExitStatus=3).
const EXIT_REJECTED: u8 = 3;

#[derive(Parser)]
#[command(name = "drover-agent", version, about = "The Drover node agent")]
struct Cli {
    #[command(flatten)]
    args: AgentArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Trade a one-time bootstrap token for this machine's identity.
    Enroll {
        /// The bootstrap token from `drover token create`; TOKEN#sha256:HEX
        /// also pins the server's certificate (as --ca-fingerprint does).
        #[arg(long, env = "DROVER_AGENT_TOKEN", hide_env_values = true)]
        token: String,
        /// Replace an identity already in the state dir.
        #[arg(long)]
        force: bool,
    },
    /// Run the agent (enrolling first when --token is given and the state
    /// dir holds no identity yet).
    Run {
        /// A bootstrap token to enroll with first, when the state dir holds
        /// no identity yet (ignored once enrolled).
        #[arg(long, env = "DROVER_AGENT_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Show the agent's identity and last contact from local state, without
    /// asking the server.
    Status {
        /// Output format: text for people, json for scripts.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the agent's version.
    Version,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// Logs to stderr (and what dependencies log through `log`).
fn init_logging(config: &AgentConfig) {
    logger(config, std::io::stderr).init();
}

/// Lines in `log_format` on `writer`, filtered by `log_level`
/// (`config::log_filter`, the one filter of every line).
fn logger<W>(config: &AgentConfig, writer: W) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = drover_agent::config::log_filter(&config.log_level);
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(drover_agent::config::log_colours())
        .with_writer(writer);
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Json => Box::new(registry.with(lines.json())),
        LogFormat::Human => Box::new(registry.with(lines)),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On the heap: the agent's future is large, and moved around on the
    // main thread's stack it kept 16-20 KiB more of that stack resident.
    match runtime.block_on(Box::pin(real_main(cli))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let rejected = e
                .downcast_ref::<Error>()
                .is_some_and(|e| matches!(e, Error::CredentialsRejected(_)));
            if rejected {
                ExitCode::from(EXIT_REJECTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    if let Command::Version = cli.command {
        println!("drover-agent {}", drover_agent::VERSION);
        return Ok(());
    }
    let config = AgentConfig::load(&cli.args)?;
    match cli.command {
        Command::Version => Ok(()),
        Command::Status { output } => status(&config, output),
        Command::Enroll { token, force } => {
            init_logging(&config);
            let dir = StateDir::open(&config.state_dir)?;
            let _lock = dir.lock()?;
            let creds =
                drover_agent::enroll(&dir, &enroll_options(&config, &token, force)?).await?;
            println!("{}", creds.agent_id);
            eprintln!(
                "enrolled as agent {} with {}; start it with: drover-agent run --state-dir {}",
                creds.agent_id,
                creds.server,
                dir.path().display()
            );
            Ok(())
        }
        Command::Run { token } => {
            init_logging(&config);
            let dir = StateDir::open(&config.state_dir)?;
            // Held until the agent stops.
            let _lock = dir.lock()?;
            if let (Some(token), None) = (token, dir.credentials()?) {
                drover_agent::enroll(&dir, &enroll_options(&config, &token, false)?).await?;
            }
            let shutdown = CancellationToken::new();
            tokio::spawn(drover_agent::signals::stop_on_signals(shutdown.clone()));
            let options = RunOptions {
                release_startup_code: true,
            };
            drover_agent::run_with(&config, shutdown, options).await?;
            Ok(())
        }
    }
}

/// The server, the token and the pin of an enrollment: a fingerprint
/// attached to the token (`TOKEN#sha256:HEX`) pins like --ca-fingerprint.
fn enroll_options(config: &AgentConfig, token: &str, force: bool) -> Result<EnrollOptions, Error> {
    let server = config.server.clone().ok_or(Error::NoServer)?;
    let (token, attached) = drover_agent::tls::split_token(token)?;
    Ok(EnrollOptions {
        server,
        token,
        force,
        pin: drover_agent::tls::enrollment_pin(config.pin.clone(), attached)?,
    })
}

fn status(config: &AgentConfig, output: Output) -> anyhow::Result<()> {
    let Some(dir) = StateDir::existing(&config.state_dir) else {
        anyhow::bail!(Error::NotEnrolled(config.state_dir.clone()));
    };
    let creds = dir.credentials().context("reading credentials")?;
    let local = dir.local_state().context("reading local state")?;
    let pin = match &config.pin {
        Some(pin) => Some(pin.clone()),
        None => drover_agent::tls::stored(&dir).context("reading the pinned certificate")?,
    };
    let Some(creds) = creds else {
        anyhow::bail!(Error::NotEnrolled(config.state_dir.clone()));
    };
    let view = serde_json::json!({
        "agent_id": creds.agent_id,
        "server": config.server.clone().unwrap_or(creds.server),
        "state_dir": dir.path(),
        "enrolled_at": creds.enrolled_at,
        "last_contact_at": local.last_contact_at,
        "last_error": local.last_error,
        "last_error_at": local.last_error_at,
        "heartbeat_interval_secs": local.heartbeat_interval_secs,
        "credentials_rejected": local.credentials_rejected,
        "trusts": pin.map(|p| p.describe()),
        // Results written but not yet acknowledged by the server.
        "outbox": Outbox::existing(&dir).map_or(0, |o| o.len()),
        "version": drover_agent::VERSION,
    });
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&view)?),
        Output::Text => {
            let show = |v: &serde_json::Value| match v {
                serde_json::Value::Null => "-".to_owned(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            for key in [
                "agent_id",
                "server",
                "state_dir",
                "enrolled_at",
                "last_contact_at",
                "last_error",
                "last_error_at",
                "heartbeat_interval_secs",
                "credentials_rejected",
                "trusts",
                "outbox",
                "version",
            ] {
                println!("{:<24} {}", format!("{key}:"), show(&view[key]));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A log destination the test reads back.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_level_lets_through_what_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.yaml");
        std::fs::write(&file, "log_format: json\n").unwrap();
        let loaded = AgentConfig::load(&AgentArgs {
            config: Some(file),
            ..AgentArgs::default()
        })
        .unwrap();
        // (log_level, lines expected of: debug in drover_agent, info in
        // drover_agent, info in hyper)
        let cases = [
            ("debug", [true, true, true]),
            ("info", [false, true, true]),
            ("warn,drover_agent=debug", [true, true, false]),
        ];
        for (level, want) in cases {
            let config = AgentConfig {
                log_level: level.to_owned(),
                ..loaded.clone()
            };
            let out = Lines::default();
            let writer = out.clone();
            tracing::subscriber::with_default(logger(&config, move || writer.clone()), || {
                tracing::debug!(target: "drover_agent", "a debug line");
                tracing::info!(target: "drover_agent", "an info line");
                tracing::info!(target: "hyper", "a hyper line");
            });
            let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
            let got = ["a debug line", "an info line", "a hyper line"].map(|l| text.contains(l));
            assert_eq!(got, want, "{level}: {text}");
        }
    }
}

#[cfg(test)]
mod help_tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every argument and subcommand of `drover-agent` has a description
    /// (drover's own test walks the `drover` tree the same way).
    #[test]
    fn every_argument_and_subcommand_has_help() {
        let mut command = Cli::command();
        command.build();
        let found = drover_agent::help::undocumented(&command);
        assert!(
            found.is_empty(),
            "without a description:\n  {}",
            found.join("\n  ")
        );
    }
}
