//! `${{ … }}` references in task parameters: `inputs.NAME`,
//! `tasks.ID.outputs.NAME` and `run.id`. A reference is replaced by a value
//! inside the one parameter it appears in; the result is then checked
//! against the action's parameter types like any other value, and becomes
//! part of a single argv element. Nothing is ever evaluated.

use std::collections::BTreeMap;

/// What a reference names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ref {
    Input(String),
    TaskOutput(String, String),
    RunId,
    /// `secrets.NAME`: allowed in env values only, where it stays a
    /// reference until the server hands the attempt to an agent.
    Secret(String),
}

const OPEN: &str = "${{";
const CLOSE: &str = "}}";

fn parse_ref(expr: &str) -> Result<Ref, String> {
    let parts: Vec<&str> = expr.split('.').collect();
    match parts.as_slice() {
        ["inputs", name] if super::def::is_name(name) => Ok(Ref::Input((*name).to_owned())),
        ["tasks", task, "outputs", name]
            if super::def::is_name(task) && drover_proto::workflows::valid_output_name(name) =>
        {
            Ok(Ref::TaskOutput((*task).to_owned(), (*name).to_owned()))
        }
        ["run", "id"] => Ok(Ref::RunId),
        ["secrets", name] if crate::vault::is_secret_name(name) => {
            Ok(Ref::Secret((*name).to_owned()))
        }
        _ => Err(format!(
            "unknown reference '{expr}': use inputs.NAME, tasks.ID.outputs.NAME, run.id or (in env) secrets.NAME"
        )),
    }
}

/// Splits a value into literal text and references.
fn pieces(s: &str) -> Result<Vec<Result<&str, Ref>>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find(OPEN) {
        if start > 0 {
            out.push(Ok(&rest[..start]));
        }
        let after = &rest[start + OPEN.len()..];
        let end = after
            .find(CLOSE)
            .ok_or_else(|| format!("'{OPEN}' without a closing '{CLOSE}'"))?;
        out.push(Err(parse_ref(after[..end].trim())?));
        rest = &after[end + CLOSE.len()..];
    }
    if !rest.is_empty() {
        out.push(Ok(rest));
    }
    Ok(out)
}

/// The references in a value.
pub fn refs(s: &str) -> Result<Vec<Ref>, String> {
    Ok(pieces(s)?.into_iter().filter_map(Result::err).collect())
}

/// What references resolve against.
#[derive(Debug)]
pub struct Scope<'a> {
    pub run_id: &'a str,
    pub inputs: &'a BTreeMap<String, String>,
    /// Outputs of the tasks that ended, by task id.
    pub outputs: &'a BTreeMap<String, BTreeMap<String, String>>,
}

/// Replaces every reference in `s`; a missing value is an error naming it.
pub fn render(s: &str, scope: &Scope<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    for piece in pieces(s)? {
        match piece {
            Ok(text) => out.push_str(text),
            Err(Ref::RunId) => out.push_str(scope.run_id),
            // Kept as a reference: only dispatch puts the value in.
            Err(Ref::Secret(name)) => {
                out.push_str(&format!("${{{{ secrets.{name} }}}}"));
            }
            Err(Ref::Input(name)) => out.push_str(
                scope
                    .inputs
                    .get(&name)
                    .ok_or_else(|| format!("inputs.{name} has no value"))?,
            ),
            Err(Ref::TaskOutput(task, name)) => out.push_str(
                scope
                    .outputs
                    .get(&task)
                    .and_then(|o| o.get(&name))
                    .ok_or_else(|| {
                        format!("tasks.{task}.outputs.{name} was not set by '{task}'")
                    })?,
            ),
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn references_are_found_and_rendered() {
        let inputs = BTreeMap::from([("env".to_owned(), "prod; rm -rf /".to_owned())]);
        let outputs = BTreeMap::from([(
            "build".to_owned(),
            BTreeMap::from([("image".to_owned(), "app:1".to_owned())]),
        )]);
        let scope = Scope {
            run_id: "r1",
            inputs: &inputs,
            outputs: &outputs,
        };
        let s = "deploy ${{ tasks.build.outputs.image }} to ${{inputs.env}} (${{ run.id }})";
        assert_eq!(
            refs(s).expect("valid"),
            vec![
                Ref::TaskOutput("build".into(), "image".into()),
                Ref::Input("env".into()),
                Ref::RunId
            ]
        );
        assert_eq!(
            render(s, &scope).expect("all set"),
            "deploy app:1 to prod; rm -rf / (r1)"
        );
        assert_eq!(
            render("plain $ {{ x }}", &scope).expect("no refs"),
            "plain $ {{ x }}"
        );
        let missing = render("${{ tasks.build.outputs.tag }}", &scope).expect_err("unset");
        assert!(
            missing.contains("tasks.build.outputs.tag was not set"),
            "{missing}"
        );
        assert!(refs("${{ inputs.x").expect_err("open").contains("closing"));
        assert!(refs("${{ tasks.a.b }}")
            .expect_err("bad")
            .contains("unknown reference"));
    }
}
