//! `drover users …`: accounts, their roles and scopes (admins), and your
//! own password.

use std::io::IsTerminal;

use anyhow::{bail, Context};
use chrono::Utc;
use drover_proto::access::{
    CreateUserRequest, CreatedUser, PasswordChanged, Scope, SetPasswordRequest, SetRoleRequest,
    UserView,
};
use drover_proto::api::Role;
use reqwest::Method;

use crate::ops::Target;
use crate::output::{self, Output};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RoleArg {
    Admin,
    Operator,
    Viewer,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Admin => Role::Admin,
            RoleArg::Operator => Role::Operator,
            RoleArg::Viewer => Role::Viewer,
        }
    }
}

/// An operator's scope on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct ScopeArgs {
    /// Operators only: the agents they may reach, as a target selector
    /// (role=web,env=prod · 'role in (web,api),!env=prod' · group:NAME · an
    /// agent id; docs/SELECTORS.md).
    #[arg(long = "scope-target", value_name = "SELECTOR")]
    target: Option<String>,
    /// Operators only: the actions they may run (repeatable glob, e.g.
    /// --scope-action 'web.*').
    #[arg(long = "scope-action", value_name = "GLOB")]
    actions: Vec<String>,
}

impl ScopeArgs {
    pub fn scope(&self) -> Option<Scope> {
        let s = Scope {
            target: self.target.clone(),
            actions: self.actions.clone(),
        };
        (!s.is_everywhere()).then_some(s)
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum UsersCommand {
    /// Add a user. Without --password-stdin the server makes a password
    /// and it is printed once.
    Add {
        /// User name: letters, digits, '.', '_', '-' or '@'.
        name: String,
        /// The user's role.
        #[arg(long, value_enum)]
        role: RoleArg,
        #[command(flatten)]
        scope: ScopeArgs,
        /// Read the password from standard input.
        #[arg(long)]
        password_stdin: bool,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Every user with role, scope and state.
    List {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// One user (yourself without admin).
    Show {
        /// User name.
        name: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Give a user a role; an operator may be given a scope (none: everywhere).
    Role {
        /// User name.
        name: String,
        /// The new role.
        #[arg(value_enum)]
        role: RoleArg,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Disable a user: no login, every token refused from its next request.
    Disable {
        /// User name.
        name: String,
    },
    /// Enable a disabled user.
    Enable {
        /// User name.
        name: String,
    },
    /// Set a password: your own (you are asked for the current one), or
    /// anyone's as an admin. Without a new password on standard input
    /// (--password-stdin) the server makes one and it is printed once.
    Passwd {
        /// User name (yours to change your own password).
        name: String,
        /// Read the new password from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
}

fn read_secret(prompt: &str, from_stdin: bool) -> anyhow::Result<String> {
    if from_stdin || !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("reading from standard input")?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    rpassword::prompt_password(prompt).context("reading the password")
}

fn scope_text(scope: &Option<Scope>) -> String {
    scope
        .as_ref()
        .map(Scope::to_string)
        .unwrap_or_else(|| "everywhere".to_owned())
}

fn print_user(u: &UserView) {
    output::row(9, "user", &u.username);
    output::row(9, "id", &u.id);
    output::row(9, "role", u.role.as_str());
    output::row(9, "scope", &scope_text(&u.scope));
    output::row(
        9,
        "created",
        &u.created_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    );
    let state = match u.disabled_at {
        Some(t) => format!("disabled since {}", t.format("%Y-%m-%d %H:%M:%S UTC")),
        None => "enabled".to_owned(),
    };
    output::row(9, "state", &state);
}

fn path_of(name: &str) -> anyhow::Result<String> {
    Ok(format!("/users/{}", crate::client::segment(name)?))
}

pub async fn users(target: &Target, cmd: UsersCommand) -> anyhow::Result<()> {
    let api = target.api()?;
    match cmd {
        UsersCommand::Add {
            name,
            role,
            scope,
            password_stdin,
            output,
        } => {
            let password = if password_stdin {
                Some(read_secret("", true)?)
            } else {
                None
            };
            let created: CreatedUser = api
                .post(
                    "/users",
                    &CreateUserRequest {
                        username: name,
                        role: role.into(),
                        password,
                        scope: scope.scope(),
                    },
                )
                .await?;
            match output {
                Output::Json => output::json(&created)?,
                Output::Text => {
                    print_user(&created.user);
                    if let Some(p) = &created.password {
                        eprintln!("password (shown once): {p}");
                    }
                }
            }
        }
        UsersCommand::List { output } => {
            let users: Vec<UserView> = api.get("/users").await?;
            match output {
                Output::Json => output::json(&users)?,
                Output::Text => {
                    let now = Utc::now();
                    let rows: Vec<Vec<String>> = users
                        .iter()
                        .map(|u| {
                            vec![
                                u.username.clone(),
                                u.role.as_str().to_owned(),
                                scope_text(&u.scope),
                                if u.disabled_at.is_some() {
                                    "disabled".to_owned()
                                } else {
                                    "enabled".to_owned()
                                },
                                output::ago(Some(u.created_at), now),
                            ]
                        })
                        .collect();
                    output::table(&["USER", "ROLE", "SCOPE", "STATE", "CREATED"], &rows);
                }
            }
        }
        UsersCommand::Show { name, output } => {
            let u: UserView = api.get(&path_of(&name)?).await?;
            match output {
                Output::Json => output::json(&u)?,
                Output::Text => print_user(&u),
            }
        }
        UsersCommand::Role { name, role, scope } => {
            let u: UserView = api
                .call(
                    Method::PUT,
                    &format!("{}/role", path_of(&name)?),
                    Some(&SetRoleRequest {
                        role: role.into(),
                        scope: scope.scope(),
                    }),
                    true,
                )
                .await?;
            eprintln!(
                "{} is now {} ({}); it counts from their next request",
                u.username,
                u.role.as_str(),
                scope_text(&u.scope)
            );
        }
        UsersCommand::Disable { name } => {
            let u: UserView = api
                .post(&format!("{}/disable", path_of(&name)?), &())
                .await?;
            eprintln!(
                "{} is disabled: no login, and every token of theirs is refused",
                u.username
            );
        }
        UsersCommand::Enable { name } => {
            let u: UserView = api
                .post(&format!("{}/enable", path_of(&name)?), &())
                .await?;
            eprintln!("{} is enabled", u.username);
        }
        UsersCommand::Passwd {
            name,
            password_stdin,
        } => {
            let path = format!("{}/password", path_of(&name)?);
            let (password, mut current) = if password_stdin || !std::io::stdin().is_terminal() {
                // The new password on the first line; your current one on
                // the second when you change your own without admin.
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .context("reading standard input")?;
                let mut lines = text.lines().map(str::to_owned);
                let new = lines.next().filter(|l| !l.is_empty());
                (new, lines.next())
            } else {
                let new = read_secret("New password (empty: let the server make one): ", false)?;
                if !new.is_empty() && read_secret("Again: ", false)? != new {
                    bail!("the two passwords differ; nothing changed");
                }
                ((!new.is_empty()).then_some(new), None)
            };
            let mut asked = false;
            let changed: PasswordChanged = loop {
                let req = SetPasswordRequest {
                    password: password.clone(),
                    current_password: current.clone(),
                };
                match api.post(&path, &req).await {
                    Ok(c) => break c,
                    Err(e)
                        if !asked
                            && current.is_none()
                            && std::io::stdin().is_terminal()
                            && e.to_string().contains("current_password") =>
                    {
                        asked = true;
                        current = Some(read_secret("Current password: ", false)?);
                    }
                    Err(e) => return Err(e),
                }
            };
            if let Some(p) = &changed.password {
                eprintln!("new password for {name} (shown once): {p}");
            }
            eprintln!(
                "password of {name} set; {} other session(s) ended",
                changed.sessions_ended
            );
        }
    }
    Ok(())
}
