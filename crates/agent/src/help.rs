//! A check both binaries' tests run on their command-line trees: every
//! argument and subcommand a user can see has a description.

/// Every visible argument and subcommand of `command`, at every depth,
/// without help text, named by its path (`drover agents show id`). Call
/// it on a built command (`Command::build`).
pub fn undocumented(command: &clap::Command) -> Vec<String> {
    let mut found = Vec::new();
    walk(command, command.get_name(), &mut found);
    found
}

fn walk(command: &clap::Command, path: &str, found: &mut Vec<String>) {
    for arg in command.get_arguments() {
        let builtin = matches!(arg.get_id().as_str(), "help" | "version");
        if !builtin && !arg.is_hide_set() && arg.get_help().is_none() {
            found.push(format!("{path} {}", arg.get_id()));
        }
    }
    for sub in command.get_subcommands() {
        // clap's own `help` subcommand mirrors the real ones.
        if sub.get_name() == "help" {
            continue;
        }
        let name = format!("{path} {}", sub.get_name());
        if sub.get_about().is_none() && !sub.is_hide_set() {
            found.push(name.clone());
        }
        walk(sub, &name, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_has_no_help() {
        let mut command = clap::Command::new("tool")
            .arg(
                clap::Arg::new("documented")
                    .long("documented")
                    .help("Has help"),
            )
            .arg(clap::Arg::new("bare").long("bare"))
            .subcommand(clap::Command::new("sub").arg(clap::Arg::new("inner").long("inner")));
        command.build();
        assert_eq!(
            undocumented(&command),
            ["tool bare", "tool sub", "tool sub inner"]
        );
    }
}
