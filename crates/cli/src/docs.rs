//! `drover completions` and `drover man`: shell completion scripts and
//! man pages, generated from the same clap definitions as `--help`.

use std::path::PathBuf;

use anyhow::Context;

/// Flags of `drover completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// The shells `drover completions` writes scripts for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Flags of `drover man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// The directory to write the pages into (created if missing).
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub dir: PathBuf,
}

/// Prints the completion script of `shell` on stdout.
pub fn completions(cmd: &mut clap::Command, args: CompletionsArgs) -> anyhow::Result<()> {
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let name = cmd.get_name().to_owned();
    clap_complete::generate(shell, cmd, name, &mut std::io::stdout());
    Ok(())
}

/// Writes `drover.1` and one page per subcommand, at every depth
/// (`drover-agents-list.1`), into `args.dir`; prints their paths.
pub fn man(cmd: clap::Command, args: ManArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    // Built, every subcommand knows its full name (drover-agents-list).
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    write_pages(cmd, &args.dir)
}

fn write_pages(cmd: clap::Command, dir: &std::path::Path) -> anyhow::Result<()> {
    let page = clap_mangen::Man::new(cmd.clone());
    let path = page
        .generate_to(dir)
        .with_context(|| format!("writing {}", dir.join(page.get_filename()).display()))?;
    println!("{}", path.display());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir)?;
    }
    Ok(())
}
