//! Operator commands that talk to a running server over its REST API.

use std::io::IsTerminal;

use anyhow::{bail, Context};
use chrono::Utc;
use drover_proto::access::TokenView;
use drover_proto::api::{
    Agent, CreateTokenRequest, CreatedToken, DispatchState, DrainAgentRequest, FleetStatus,
    LabelAgentRequest, LoginRequest, LoginResponse, RevokeAgentRequest, SetGroupRequest,
    StopRequest, StopResponse, TokenKind,
};
use drover_proto::labels::{check_key, parse_pair, Labels};
use reqwest::Method;

use crate::client::Api;
use crate::output::{self, Output};
use crate::profile::{self, Profile, ProfileFile};

async fn token_list(target: &Target, all: bool, output: Output) -> anyhow::Result<()> {
    let api = target.api()?;
    let tokens: Vec<TokenView> = api
        .get(if all { "/tokens?all=true" } else { "/tokens" })
        .await?;
    match output {
        Output::Json => output::json(&tokens)?,
        Output::Text => {
            let now = Utc::now();
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.kind.clone(),
                        t.username.clone(),
                        t.role
                            .map(|r| r.as_str().to_owned())
                            .unwrap_or_else(|| "-".to_owned()),
                        t.scope
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_else(|| "-".to_owned()),
                        t.state.clone(),
                        output::ago(Some(t.created_at), now),
                        t.expires_at
                            .map(|e| e.format("%Y-%m-%d %H:%M UTC").to_string())
                            .unwrap_or_else(|| "-".to_owned()),
                        t.name.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "ID", "KIND", "USER", "ROLE", "SCOPE", "STATE", "CREATED", "EXPIRES", "NAME",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

/// The server URL used when neither flag, variable nor profile names one.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

/// The profile used when none is named.
pub const DEFAULT_PROFILE: &str = "default";

/// Which server and credentials the command uses.
#[derive(Debug, Clone)]
pub struct Target {
    pub server: Option<String>,
    pub token: Option<String>,
    pub profile: String,
    /// Whether the profile was named (flag or variable): a named profile
    /// must exist, except for the commands that save one.
    pub profile_given: bool,
    pub ca_file: Option<std::path::PathBuf>,
    pub ca_fingerprint: Option<String>,
}

/// The server's pin as given: a CA file or a fingerprint.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub ca_file: Option<std::path::PathBuf>,
    pub ca_fingerprint: Option<String>,
}

impl Target {
    /// Resolves server, token and pin: flag or variable, else the profile.
    /// The profile's token and pin are used only with its own server. A
    /// profile named but not saved is an error.
    pub fn api(&self) -> anyhow::Result<Api> {
        let file = self.profiles()?;
        if self.profile_given && !file.profiles.contains_key(&self.profile) {
            // With no profile file at all, `default` is simply empty.
            let exists = !file.profiles.is_empty() || profile::path().exists();
            if self.profile != DEFAULT_PROFILE || exists {
                bail!("{}", unknown_profile(&self.profile, &file));
            }
        }
        self.api_with(&file)
    }

    /// Like `api`, for the commands that save the profile (`login`): a
    /// profile not saved yet is fine.
    pub fn api_for_saving(&self) -> anyhow::Result<Api> {
        self.api_with(&self.profiles()?)
    }

    fn profiles(&self) -> anyhow::Result<ProfileFile> {
        ProfileFile::load(&profile::path())
    }

    fn api_with(&self, file: &ProfileFile) -> anyhow::Result<Api> {
        let saved = file.profiles.get(&self.profile);
        let server = match &self.server {
            Some(s) => crate::client::server_url(s)?,
            None => saved
                .map(|p| p.server.clone())
                .unwrap_or_else(|| DEFAULT_SERVER.to_owned()),
        };
        let own = saved.filter(|p| same_server(&p.server, &server));
        let token = self
            .token
            .clone()
            .or_else(|| own.and_then(|p| p.token.clone()));
        let trust = if self.ca_file.is_some() || self.ca_fingerprint.is_some() {
            Trust {
                ca_file: self.ca_file.clone(),
                ca_fingerprint: self.ca_fingerprint.clone(),
            }
        } else {
            own.map(|p| Trust {
                ca_file: p.ca_file.clone(),
                ca_fingerprint: p.ca_fingerprint.clone(),
            })
            .unwrap_or_default()
        };
        Api::new(&server, token, trust)
    }
}

/// "no profile named 'x' in PATH (profiles: a, b)".
fn unknown_profile(name: &str, file: &ProfileFile) -> String {
    let names: Vec<&str> = file.profiles.keys().map(String::as_str).collect();
    format!(
        "no profile named '{name}' in {} ({}); drover login --profile {name} saves one",
        profile::path().display(),
        if names.is_empty() {
            "no profiles saved".to_owned()
        } else {
            format!("profiles: {}", names.join(", "))
        }
    )
}

fn same_server(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// User name.
    #[arg(long, short, default_value = "admin")]
    username: String,
    /// Read the password from standard input instead of prompting.
    #[arg(long)]
    password_stdin: bool,
}

pub async fn login(target: &Target, args: LoginArgs) -> anyhow::Result<()> {
    let api = target.api_for_saving()?;
    let password = if args.password_stdin || !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        rpassword::prompt_password(format!(
            "Password for {} at {}: ",
            args.username, api.server
        ))
        .context("reading the password")?
    };
    let resp: LoginResponse = api
        .call(
            Method::POST,
            "/auth/login",
            Some(&LoginRequest {
                username: args.username,
                password,
            }),
            false,
        )
        .await?;
    let path = profile::path();
    let mut file = ProfileFile::load(&path)?;
    file.profiles.insert(
        target.profile.clone(),
        Profile {
            server: api.server.clone(),
            token: Some(resp.token),
            ca_file: api.trust.ca_file.clone(),
            ca_fingerprint: api.trust.ca_fingerprint.clone(),
        },
    );
    file.save(&path)?;
    eprintln!(
        "logged in to {} as {} until {}; session saved in {} (profile '{}')",
        api.server,
        resp.username,
        resp.expires_at.format("%Y-%m-%d %H:%M UTC"),
        path.display(),
        target.profile
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct LogoutArgs {
    /// Forget the token even when the server cannot be told (unreachable,
    /// or it refuses the token already).
    #[arg(long)]
    force: bool,
}

/// Ends the profile's session: the server revokes the token, then the
/// profile forgets it (its server and pin stay, for the next login).
/// Only the profile's own token: one from --token or DROVER_TOKEN is not
/// the profile's to end (`drover token revoke` does that).
pub async fn logout(target: &Target, args: LogoutArgs) -> anyhow::Result<()> {
    let path = profile::path();
    let mut file = ProfileFile::load(&path)?;
    let Some(saved) = file.profiles.get(&target.profile).cloned() else {
        if target.profile_given {
            bail!("{}", unknown_profile(&target.profile, &file));
        }
        eprintln!(
            "not logged in: no profile '{}' in {}",
            target.profile,
            path.display()
        );
        return Ok(());
    };
    let Some(token) = saved.token.clone() else {
        eprintln!(
            "not logged in: profile '{}' holds no token (server {})",
            target.profile, saved.server
        );
        return Ok(());
    };
    let api = Api::new(
        &saved.server,
        Some(token),
        Trust {
            ca_file: saved.ca_file.clone(),
            ca_fingerprint: saved.ca_fingerprint.clone(),
        },
    )?;
    let ended = match api.post::<(), TokenView>("/auth/logout", &()).await {
        Ok(t) => format!("{} token {} revoked", t.kind, t.id),
        Err(e) => {
            let refused = e
                .downcast_ref::<crate::client::ApiFailure>()
                .is_some_and(|f| f.status == 401);
            if refused {
                "the server no longer accepted the token".to_owned()
            } else if args.force {
                format!("the server was not told ({e:#})")
            } else {
                return Err(e.context(
                    "the session was not ended: the token stays in the profile \
                     (drover logout --force forgets it anyway)",
                ));
            }
        }
    };
    if let Some(p) = file.profiles.get_mut(&target.profile) {
        p.token = None;
    }
    file.save(&path)?;
    eprintln!(
        "logged out of {} (profile '{}'): {ended}",
        saved.server, target.profile
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct WhoamiArgs {
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// `drover whoami -o json`: what the server says, and where it was asked.
#[derive(Debug, serde::Serialize)]
struct WhoamiView {
    server: String,
    profile: String,
    #[serde(flatten)]
    whoami: drover_proto::access::Whoami,
}

pub async fn whoami(target: &Target, args: WhoamiArgs) -> anyhow::Result<()> {
    let api = target.api()?;
    let me: drover_proto::access::Whoami = api.get("/auth/whoami").await?;
    match args.output {
        Output::Json => output::json(&WhoamiView {
            server: api.server.clone(),
            profile: target.profile.clone(),
            whoami: me,
        })?,
        Output::Text => {
            let row = |k: &str, v: String| output::row(12, k, &v);
            let everywhere = || "everywhere its role allows".to_owned();
            row("server", api.server.clone());
            row("profile", target.profile.clone());
            row("user", me.username.clone());
            row("role", me.role.as_str().to_owned());
            row(
                "scope",
                me.scope
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_else(everywhere),
            );
            let t = &me.token;
            row(
                "token",
                format!(
                    "{} {}{}",
                    t.kind,
                    t.id,
                    t.name
                        .as_deref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                ),
            );
            if let Some(scope) = &t.scope {
                row("token scope", scope.to_string());
            }
            row(
                "expires",
                t.expires_at
                    .map(|e| e.format("%Y-%m-%d %H:%M UTC").to_string())
                    .unwrap_or_else(|| "never".to_owned()),
            );
        }
    }
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a one-time bootstrap token for enrolling an agent (default;
    /// admins), or an API token for CI with --kind api (a role and scope
    /// never beyond yours). Prints the token on stdout.
    Create {
        /// bootstrap: enrolls one agent, once; api: a token for scripts and CI.
        #[arg(long, value_enum, default_value_t = Kind::Bootstrap)]
        kind: Kind,
        /// Lifetime, e.g. 30m, 1h, 7d [bootstrap: default 1h, at most 30d;
        /// api: default 90d, at most 365d].
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// An API token's role: at most (and by default) yours.
        #[arg(long, value_enum)]
        role: Option<crate::users::RoleArg>,
        #[command(flatten)]
        scope: crate::users::ScopeArgs,
        /// A label the enrolled agent gets (repeatable): --label role=web.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// The group the enrolled agent joins.
        #[arg(long)]
        group: Option<String>,
        /// A note to recognise the token by.
        #[arg(long)]
        name: Option<String>,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Your tokens (sessions, API tokens, bootstrap tokens you made), or
    /// everyone's with --all (admins). Never the secrets.
    List {
        /// Everyone's tokens (admins).
        #[arg(long)]
        all: bool,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Revoke a token by id: it stops working on its next request.
    Revoke {
        /// Token id (see drover token list).
        id: String,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Kind {
    Bootstrap,
    Api,
}

fn parse_labels(pairs: &[String]) -> anyhow::Result<Labels> {
    let mut labels = Labels::new();
    for p in pairs {
        let (k, v) = parse_pair(p)?;
        labels.insert(k, v);
    }
    Ok(labels)
}

pub async fn token(target: &Target, cmd: TokenCommand) -> anyhow::Result<()> {
    let (kind, ttl, role, scope, labels, group, name, output) = match cmd {
        TokenCommand::Create {
            kind,
            ttl,
            role,
            scope,
            labels,
            group,
            name,
            output,
        } => (kind, ttl, role, scope, labels, group, name, output),
        TokenCommand::List { all, output } => return token_list(target, all, output).await,
        TokenCommand::Revoke { id } => {
            let api = target.api()?;
            let t: TokenView = api
                .post(
                    &format!("/tokens/{}/revoke", crate::client::segment(&id)?),
                    &(),
                )
                .await?;
            eprintln!(
                "{} token {} of {} revoked: it stops working on its next request",
                t.kind, t.id, t.username
            );
            return Ok(());
        }
    };
    let req = CreateTokenRequest {
        role: role.map(Into::into),
        scope: scope.scope(),
        kind: match kind {
            Kind::Bootstrap => TokenKind::Bootstrap,
            Kind::Api => TokenKind::Api,
        },
        ttl_secs: ttl.map(|d| d.as_secs().max(1)),
        labels: parse_labels(&labels)?,
        group,
        name,
    };
    let api = target.api()?;
    let created: CreatedToken = api.post("/tokens", &req).await?;
    match output {
        Output::Json => output::json(&created)?,
        Output::Text => {
            println!("{}", created.token);
            let expiry = created
                .expires_at
                .map(|t| format!("expires {}", t.format("%Y-%m-%d %H:%M:%S UTC")))
                .unwrap_or_else(|| "does not expire".to_owned());
            match created.kind {
                TokenKind::Bootstrap => {
                    // Over HTTPS the agent pins the server's certificate.
                    let pin = created
                        .tls_fingerprint
                        .as_deref()
                        .map(|f| format!(" --ca-fingerprint {f}"))
                        .unwrap_or_default();
                    eprintln!(
                        "one-time bootstrap token {} ({expiry}); enroll with:\n  drover-agent enroll --server {}{pin} --token <TOKEN>",
                        created.id, api.server
                    )
                }
                TokenKind::Api => eprintln!(
                    "API token {} ({expiry}); use it with DROVER_TOKEN=<TOKEN> or --token",
                    created.id
                ),
            }
        }
    }
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum AgentsCommand {
    /// List enrolled agents and their health.
    List {
        /// Only the agents this target selects, exactly as drover run
        /// --target would: an agent id, *, or terms such as
        /// 'role in (web,api),!env=prod' (see docs/SELECTORS.md).
        #[arg(long = "target", value_name = "SELECTOR")]
        selector: Option<String>,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show one agent with its inventory.
    Show {
        /// Agent id or a unique prefix of it.
        id: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Set labels (KEY=VALUE) and remove them (--remove KEY).
    Label {
        /// Agent id or a unique prefix of it.
        id: String,
        /// Labels to set.
        #[arg(value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// A label to remove (repeatable).
        #[arg(long, value_name = "KEY")]
        remove: Vec<String>,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Revoke an agent: its next request is refused and it stops.
    Revoke {
        /// Agent id or a unique prefix of it.
        id: String,
        /// Why: recorded with the agent and in the audit log.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Give an agent no new work; what it runs finishes.
    Drain {
        /// Agent id or a unique prefix of it.
        id: String,
        /// Why: shown with the agent and recorded in the audit log.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Stop an agent: no new work, and what it runs is cancelled (SIGTERM,
    /// then SIGKILL after each job's kill grace).
    Stop {
        /// Agent id or a unique prefix of it.
        id: String,
        /// Kill what runs at once (SIGKILL), without the kill grace.
        #[arg(long)]
        force: bool,
        /// Why: shown with the agent and recorded in the audit log.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Let a drained or stopped agent take work again.
    Resume {
        /// Agent id or a unique prefix of it.
        id: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Move an agent to a group (selected with group:NAME), or out of its
    /// group with --clear.
    SetGroup {
        /// Agent id or a unique prefix of it.
        id: String,
        /// The group: 1-63 characters from a-z A-Z 0-9 . _ -.
        #[arg(required_unless_present = "clear", conflicts_with = "clear")]
        group: Option<String>,
        /// Take the agent out of its group.
        #[arg(long)]
        clear: bool,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove a revoked agent: it leaves listings and targets; the jobs it
    /// ran keep its id in their history.
    Rm {
        /// Agent id or a unique prefix of it (the agent must be revoked).
        id: String,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// Emergency stop: pause dispatch on every agent and cancel every
    /// running attempt (SIGTERM, then SIGKILL after the kill grace).
    Stop {
        /// Kill every running attempt at once (SIGKILL).
        #[arg(long)]
        force: bool,
        /// Why: shown in drover fleet status and recorded in the audit log.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// End the emergency stop: dispatch resumes.
    Resume {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Whether dispatch is paused fleet-wide, and agents by dispatch state.
    Status {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

fn labels_text(labels: &Labels) -> String {
    if labels.is_empty() {
        return "-".to_owned();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn print_agent(a: &Agent) {
    let now = Utc::now();
    let row = |k: &str, v: String| output::row(16, k, &v);
    row("id", a.id.clone());
    row("hostname", a.hostname.clone());
    row("status", a.status.as_str().to_owned());
    row("labels", labels_text(&a.labels));
    row("group", a.group.clone().unwrap_or_else(|| "-".to_owned()));
    row(
        "version",
        a.agent_version.clone().unwrap_or_else(|| "-".to_owned()),
    );
    row("enrolled", a.enrolled_at.to_rfc3339());
    row("last seen", output::ago(a.last_seen_at, now));
    row(
        "dispatch",
        match &a.dispatch_reason {
            _ if a.revoked_at.is_some() => dispatch_text(a).to_owned(),
            Some(why) if a.dispatch != DispatchState::Active => {
                format!("{} ({why})", a.dispatch.as_str())
            }
            _ => a.dispatch.as_str().to_owned(),
        },
    );
    if let Some(t) = a.revoked_at {
        row(
            "revoked",
            format!(
                "{} ({})",
                t.to_rfc3339(),
                a.revoked_reason.as_deref().unwrap_or("-")
            ),
        );
    }
    if let Some(inv) = &a.inventory {
        row("os", format!("{} {}", inv.os, inv.os_version));
        row("kernel", inv.kernel.clone());
        row("arch", inv.arch.clone());
        row("cpus", inv.cpu_count.to_string());
        row(
            "load",
            format!(
                "{:.2} {:.2} {:.2}",
                inv.load_avg[0], inv.load_avg[1], inv.load_avg[2]
            ),
        );
        row(
            "memory",
            format!(
                "{} used of {}",
                output::bytes(inv.memory_used_bytes),
                output::bytes(inv.memory_total_bytes)
            ),
        );
        row(
            "disk",
            format!(
                "{} free of {}",
                output::bytes(inv.disk_available_bytes),
                output::bytes(inv.disk_total_bytes)
            ),
        );
        row("agent uptime", format!("{}s", inv.agent_uptime_secs));
        row("system uptime", format!("{}s", inv.system_uptime_secs));
        row(
            "capacity",
            format!("{} running of {}", inv.running, inv.capacity),
        );
        row(
            "sandboxes",
            if inv.sandboxes.is_empty() {
                "-".to_owned()
            } else {
                inv.sandboxes.join(", ")
            },
        );
        row("docker", docker_text(inv.docker.as_ref()));
        if let Some(p) = &inv.problem {
            row("problem", format!("takes no work: {p}"));
        }
    }
}

/// What an agent says about its Docker engine, in one line.
fn docker_text(d: Option<&drover_proto::sandbox::DockerStatus>) -> String {
    match d {
        None => "not configured".to_owned(),
        Some(d) if !d.available => format!(
            "unavailable ({})",
            d.error.as_deref().unwrap_or("no answer")
        ),
        Some(d) => {
            let mut s = format!(
                "{} (runtimes: {})",
                d.version.as_deref().unwrap_or("?"),
                if d.runtimes.is_empty() {
                    "-".to_owned()
                } else {
                    d.runtimes.join(", ")
                }
            );
            if !d.unenforced.is_empty() {
                s.push_str(&format!("; cannot enforce: {}", d.unenforced.join(", ")));
            }
            s
        }
    }
}

/// Whether an agent takes work: `-` for a revoked one, which never does.
fn dispatch_text(a: &Agent) -> &'static str {
    if a.revoked_at.is_some() {
        "-"
    } else {
        a.dispatch.as_str()
    }
}

/// `running/capacity` of an agent's last heartbeat.
fn capacity_text(a: &Agent) -> String {
    match &a.inventory {
        Some(inv) if inv.capacity > 0 => format!("{}/{}", inv.running, inv.capacity),
        _ => "-".to_owned(),
    }
}

fn agent_path(id: &str) -> anyhow::Result<String> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        bail!("'{id}' is not an agent id");
    }
    Ok(format!("/agents/{id}"))
}

pub async fn agents(target: &Target, cmd: AgentsCommand) -> anyhow::Result<()> {
    let api = target.api()?;
    match cmd {
        AgentsCommand::List { selector, output } => {
            let path = match &selector {
                Some(sel) => format!("/agents?target={}", crate::client::segment(sel)?),
                None => "/agents".to_owned(),
            };
            let agents: Vec<Agent> = api.get(&path).await?;
            if let (Some(sel), Output::Text) = (&selector, output) {
                let paused = agents
                    .iter()
                    .filter(|a| a.revoked_at.is_none() && a.dispatch != DispatchState::Active)
                    .count();
                match (agents.len(), paused) {
                    (0, _) => eprintln!("target '{sel}' matches no agent"),
                    (n, 0) => eprintln!("target '{sel}' matches {n} agent(s)"),
                    (n, p) => eprintln!(
                        "target '{sel}' matches {n} agent(s); {p} take(s) no new work (draining or stopped) and would be given none"
                    ),
                }
            }
            match output {
                Output::Json => output::json(&agents)?,
                Output::Text => {
                    let now = Utc::now();
                    let rows: Vec<Vec<String>> = agents
                        .iter()
                        .map(|a| {
                            let docker = a
                                .inventory
                                .as_ref()
                                .and_then(|i| i.docker.as_ref())
                                .map(|d| if d.available { "yes" } else { "no" })
                                .unwrap_or("-");
                            vec![
                                a.id.clone(),
                                a.hostname.clone(),
                                match a.inventory.as_ref().and_then(|i| i.problem.as_ref()) {
                                    Some(p) => {
                                        format!("{} (takes no work: {p})", a.status.as_str())
                                    }
                                    None => a.status.as_str().to_owned(),
                                },
                                dispatch_text(a).to_owned(),
                                capacity_text(a),
                                docker.to_owned(),
                                output::ago(a.last_seen_at, now),
                                a.group.clone().unwrap_or_else(|| "-".to_owned()),
                                labels_text(&a.labels),
                            ]
                        })
                        .collect();
                    output::table(
                        &[
                            "ID",
                            "HOSTNAME",
                            "STATUS",
                            "DISPATCH",
                            "RUNNING",
                            "DOCKER",
                            "LAST SEEN",
                            "GROUP",
                            "LABELS",
                        ],
                        &rows,
                    );
                }
            }
        }
        AgentsCommand::Show { id, output } => {
            let a: Agent = api.get(&agent_path(&id)?).await?;
            match output {
                Output::Json => output::json(&a)?,
                Output::Text => print_agent(&a),
            }
        }
        AgentsCommand::Label {
            id,
            set,
            remove,
            output,
        } => {
            if set.is_empty() && remove.is_empty() {
                bail!("nothing to change: give KEY=VALUE pairs and/or --remove KEY");
            }
            for k in &remove {
                check_key(k)?;
            }
            let req = LabelAgentRequest {
                set: parse_labels(&set)?,
                remove,
            };
            let a: Agent = api
                .patch(&format!("{}/labels", agent_path(&id)?), &req)
                .await?;
            match output {
                Output::Json => output::json(&a)?,
                Output::Text => println!("{}\t{}", a.id, labels_text(&a.labels)),
            }
        }
        AgentsCommand::Revoke { id, reason, output } => {
            let a: Agent = api
                .post(
                    &format!("{}/revoke", agent_path(&id)?),
                    &RevokeAgentRequest { reason },
                )
                .await?;
            match output {
                Output::Json => output::json(&a)?,
                Output::Text => {
                    println!("{}", a.id);
                    eprintln!("agent {} revoked: its next request will be refused", a.id);
                }
            }
        }
        AgentsCommand::Drain { id, reason, output } => {
            let a: Agent = api
                .post(
                    &format!("{}/drain", agent_path(&id)?),
                    &DrainAgentRequest { reason },
                )
                .await?;
            match output {
                Output::Json => output::json(&a)?,
                Output::Text => {
                    println!("{}", a.id);
                    eprintln!(
                        "agent {} drained: it takes no new work; what runs finishes (drover agents resume {} undoes it)",
                        a.id, a.id
                    );
                }
            }
        }
        AgentsCommand::Stop {
            id,
            force,
            reason,
            output,
        } => {
            let r: StopResponse = api
                .post(
                    &format!("{}/stop", agent_path(&id)?),
                    &StopRequest { force, reason },
                )
                .await?;
            match output {
                Output::Json => output::json(&r)?,
                Output::Text => {
                    println!("{}", r.cancelled);
                    eprintln!(
                        "agent {id} stopped: {} running attempt(s) {}; it takes no new work until drover agents resume {id}",
                        r.cancelled,
                        if force { "killed" } else { "cancelled" }
                    );
                }
            }
        }
        AgentsCommand::SetGroup {
            id,
            group,
            clear: _,
            output,
        } => {
            let a: Agent = api
                .call(
                    Method::PUT,
                    &format!("{}/group", agent_path(&id)?),
                    Some(&SetGroupRequest { group }),
                    true,
                )
                .await?;
            match output {
                Output::Json => output::json(&a)?,
                Output::Text => println!("{}\t{}", a.id, a.group.as_deref().unwrap_or("-")),
            }
        }
        AgentsCommand::Rm { id } => {
            let a: Agent = api.get(&agent_path(&id)?).await?;
            api.delete(&agent_path(&a.id)?).await?;
            println!("removed agent {}", a.id);
        }
        AgentsCommand::Resume { id, output } => {
            let a: Agent = api
                .post(&format!("{}/resume", agent_path(&id)?), &())
                .await?;
            match output {
                Output::Json => output::json(&a)?,
                Output::Text => {
                    println!("{}", a.id);
                    eprintln!("agent {} takes work again", a.id);
                }
            }
        }
    }
    Ok(())
}

fn print_fleet(f: &FleetStatus) {
    if f.stopped {
        println!(
            "dispatch: STOPPED since {} by {}{} ({})",
            f.stopped_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
            f.stopped_by.as_deref().unwrap_or("-"),
            if f.force { ", forced" } else { "" },
            f.reason.as_deref().unwrap_or("-")
        );
    } else {
        println!("dispatch: running");
    }
    for (state, n) in &f.agents {
        println!("agents {state}: {n}");
    }
}

pub async fn fleet(target: &Target, cmd: FleetCommand) -> anyhow::Result<()> {
    let api = target.api()?;
    match cmd {
        FleetCommand::Stop {
            force,
            reason,
            output,
        } => {
            let r: StopResponse = api
                .post("/fleet/stop", &StopRequest { force, reason })
                .await?;
            match output {
                Output::Json => output::json(&r)?,
                Output::Text => {
                    print_fleet(&r.fleet);
                    eprintln!(
                        "fleet stopped: {} attempt(s) on {} agent(s) {}; queued work waits until drover fleet resume",
                        r.cancelled,
                        r.agents,
                        if force { "killed" } else { "cancelled" }
                    );
                }
            }
        }
        FleetCommand::Resume { output } => {
            let f: FleetStatus = api.post("/fleet/resume", &()).await?;
            match output {
                Output::Json => output::json(&f)?,
                Output::Text => print_fleet(&f),
            }
        }
        FleetCommand::Status { output } => {
            let f: FleetStatus = api.get("/fleet").await?;
            match output {
                Output::Json => output::json(&f)?,
                Output::Text => print_fleet(&f),
            }
        }
    }
    Ok(())
}
