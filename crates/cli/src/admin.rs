//! `drover admin`: maintenance on a server's own store, run on the server's
//! machine without the server (no URL, no token: whoever can read the data
//! dir can already do anything to it).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use drover_agent::lock::{Lock, LockError, Mode};
use drover_server::{ServerArgs, ServerConfig, ADMIN_USER};

use crate::serve::DATA_DIR_LOCK;

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Set a user's password directly in the server's store, with the server
    /// stopped (for a lost admin password). Like `drover users passwd`, it
    /// ends the user's sessions (API tokens stay) and is audited. The new
    /// password comes from DROVER_ADMIN_PASSWORD, or standard input
    /// (--password-stdin), or a prompt.
    ResetPassword(ResetPasswordArgs),
}

/// Flags of `drover admin reset-password`.
#[derive(Debug, Args)]
pub struct ResetPasswordArgs {
    /// The server's configuration file (TOML), for its data dir and database.
    #[arg(long, env = "DROVER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The server's data dir [default: as `drover server`'s].
    #[arg(long, env = "DROVER_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The server's database, sqlite://FILE or postgres://... [default:
    /// SQLite in the data dir].
    #[arg(
        long,
        env = "DROVER_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// The user whose password is set.
    #[arg(long, default_value = ADMIN_USER, value_name = "NAME")]
    username: String,
    /// Read the new password from standard input (one line), without a
    /// prompt, even when DROVER_ADMIN_PASSWORD is set.
    #[arg(long)]
    password_stdin: bool,
}

pub async fn admin(cmd: AdminCommand) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::ResetPassword(args) => reset_password(args).await,
    }
}

async fn reset_password(args: ResetPasswordArgs) -> anyhow::Result<()> {
    let config = ServerConfig::load(&ServerArgs {
        config: args.config,
        data_dir: args.data_dir,
        database_url: args.database_url,
        ..ServerArgs::default()
    })?;
    // A SQLite store belongs to the servers on its data dir: none may run.
    // PostgreSQL is shared by design, and a password change there is what
    // the API would do.
    let _alone = if drover_server::private::sqlite_path(&config.database_url).is_some() {
        hold_alone(&config)?
    } else {
        None
    };
    let password = new_password(args.password_stdin, config.admin_password.clone())?;
    let reset = drover_server::offline::reset_password(
        &config,
        &args.username,
        &password,
        chrono::Utc::now(),
    )
    .await?;
    eprintln!(
        "password of '{}' set in {}; {} session(s) ended, API tokens kept",
        args.username, reset.database, reset.sessions_ended
    );
    if reset.disabled {
        eprintln!(
            "note: '{}' is disabled; enable it with `drover users enable {}`",
            args.username, args.username
        );
    }
    Ok(())
}

/// The data dir's lock, alone: refused while a server runs on it.
fn hold_alone(config: &ServerConfig) -> anyhow::Result<Option<Lock>> {
    let dir = &config.data_dir;
    if !dir.is_dir() {
        // No server ever ran here (the database may be elsewhere).
        return Ok(None);
    }
    match Lock::try_take(&dir.join(DATA_DIR_LOCK), Mode::Exclusive) {
        Ok(lock) => Ok(Some(lock)),
        Err(LockError::Held { pid, .. }) => Err(anyhow::anyhow!(
            "a drover server{} is running on the data dir {}: stop it first, or change the \
             password through it with `drover users passwd NAME`",
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            dir.display()
        )),
        Err(e) => Err(e.into()),
    }
}

/// The new password: standard input when asked, else the variable, else
/// a prompt (twice) on a terminal, else one line of standard input.
fn new_password(from_stdin: bool, variable: Option<String>) -> anyhow::Result<String> {
    let read_line = || -> anyhow::Result<String> {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    };
    if from_stdin {
        return read_line();
    }
    if let Some(p) = variable {
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        return read_line();
    }
    let first = rpassword::prompt_password("New password: ").context("reading the password")?;
    let again = rpassword::prompt_password("Again: ").context("reading the password")?;
    if first != again {
        anyhow::bail!("the two passwords differ; nothing changed");
    }
    Ok(first)
}
