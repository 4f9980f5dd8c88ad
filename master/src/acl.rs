//! Authorization: what each principal may do, in Mesos's model of subjects × actions ×
//! objects.
//!
//! An ACL file (`--acls FILE`, TOML) is a list of rules, tried in order; the first whose
//! action, principals and objects all match decides (`allow`, true unless said). Once a file
//! is given, what no rule matches is denied. Without one, everything is allowed, as before.
//!
//! ```toml
//! [[rule]]
//! action = "register_framework"    # see Action for every action and what its objects are
//! principals = ["batch"]            # "*" is any principal, also none (no authentication)
//! objects = ["batch", "batch/*"]    # "*": anything; "a/*": a and all under it; "x*": x…
//!
//! [[rule]]
//! action = "run_task_as"
//! principals = ["*"]
//! objects = ["root"]
//! allow = false
//! ```

use std::path::Path;

use serde::Deserialize;

/// What a principal does, and what the objects of its rules are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Subscribe a framework in a role. Object: the role.
    RegisterFramework,
    /// Launch a task of a kind. Object: `native` or `wasm`.
    LaunchTask,
    /// Run a native task as a user. Object: the user name.
    RunTaskAs,
    /// Grant a Wasm task a capability. Object: `sandbox`, `wall_clock`, `random`,
    /// `volume:NAME`, `host_env:NAME` or `connect:PATTERN`.
    GrantCapability,
    /// Make a dynamic reservation for a role. Object: the role.
    Reserve,
    /// Remove a dynamic reservation. Object: the principal it was made in.
    Unreserve,
    /// Set a role's quota. Object: the role.
    UpdateQuota,
    /// Set a role's weight. Object: the role.
    UpdateWeight,
    /// Upload a blob. Object: `*` (any blob).
    UploadBlob,
    /// Read a blob. Object: `*`.
    ReadBlob,
    /// See the cluster's state (agents, frameworks, tasks, roles). Object: `*`.
    ViewState,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::RegisterFramework => "register_framework",
            Action::LaunchTask => "launch_task",
            Action::RunTaskAs => "run_task_as",
            Action::GrantCapability => "grant_capability",
            Action::Reserve => "reserve",
            Action::Unreserve => "unreserve",
            Action::UpdateQuota => "update_quota",
            Action::UpdateWeight => "update_weight",
            Action::UploadBlob => "upload_blob",
            Action::ReadBlob => "read_blob",
            Action::ViewState => "view_state",
        }
    }

    /// Every action, for listing them.
    pub const ALL: [Action; 11] = [
        Action::RegisterFramework,
        Action::LaunchTask,
        Action::RunTaskAs,
        Action::GrantCapability,
        Action::Reserve,
        Action::Unreserve,
        Action::UpdateQuota,
        Action::UpdateWeight,
        Action::UploadBlob,
        Action::ReadBlob,
        Action::ViewState,
    ];

    /// The action called `name`.
    pub fn parse(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }
}

fn yes() -> bool {
    true
}

/// One rule of the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub action: Action,
    pub principals: Vec<String>,
    pub objects: Vec<String>,
    #[serde(default = "yes")]
    pub allow: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<Rule>,
}

/// The rules of an ACL file.
#[derive(Debug, Clone, Default)]
pub struct Acls {
    rules: Vec<Rule>,
}

/// The most rules a file may hold, and entries a rule may list.
const MAX_RULES: usize = 10_000;
const MAX_ENTRIES: usize = 1_000;

/// Why a decision was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The rule that decided (its index in the file, from 1), or none: the default deny.
    pub rule: Option<usize>,
}

impl Decision {
    /// A sentence for `agora acl check` and for refusals.
    pub fn explain(&self, principal: Option<&str>, action: Action, object: &str) -> String {
        let who = principal.map_or_else(
            || "an unauthenticated caller".to_owned(),
            |p| format!("principal {p:?}"),
        );
        let verdict = if self.allowed { "may" } else { "may not" };
        match self.rule {
            Some(n) => format!(
                "{who} {verdict} {} {object:?} (ACL rule {n})",
                action.name()
            ),
            None => format!(
                "{who} may not {} {object:?}: no ACL rule allows it (what no rule matches is denied)",
                action.name()
            ),
        }
    }
}

fn matches(patterns: &[String], value: Option<&str>) -> bool {
    patterns.iter().any(|p| match (p.as_str(), value) {
        ("*", _) => true,
        (_, None) => false,
        (p, Some(v)) => {
            if let Some(prefix) = p.strip_suffix("/*") {
                v == prefix || v.strip_prefix(prefix).is_some_and(|r| r.starts_with('/'))
            } else if let Some(prefix) = p.strip_suffix('*') {
                v.starts_with(prefix)
            } else {
                p == v
            }
        }
    })
}

impl Acls {
    /// Reads and checks an ACL file.
    ///
    /// # Errors
    /// When it cannot be read or is not a valid ACL file (naming what is wrong).
    pub fn load(path: &Path) -> Result<Acls, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the ACL file {}: {e}", path.display()))?;
        Acls::parse(&text).map_err(|e| format!("the ACL file {}: {e}", path.display()))
    }

    /// # Errors
    /// As [`Acls::load`].
    pub fn parse(text: &str) -> Result<Acls, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.rule.len() > MAX_RULES {
            return Err(format!("more than {MAX_RULES} rules"));
        }
        for (i, r) in file.rule.iter().enumerate() {
            let n = i + 1;
            if r.principals.is_empty() || r.objects.is_empty() {
                return Err(format!(
                    "rule {n} ({}): principals and objects must each list at least one (\"*\" for any)",
                    r.action.name()
                ));
            }
            if r.principals.len() > MAX_ENTRIES || r.objects.len() > MAX_ENTRIES {
                return Err(format!("rule {n}: more than {MAX_ENTRIES} entries"));
            }
        }
        Ok(Acls { rules: file.rule })
    }

    /// Whether `principal` (none: unauthenticated) may do `action` to `object`.
    pub fn decide(&self, principal: Option<&str>, action: Action, object: &str) -> Decision {
        for (i, r) in self.rules.iter().enumerate() {
            if r.action == action
                && matches(&r.principals, principal)
                && matches(&r.objects, Some(object))
            {
                return Decision {
                    allowed: r.allow,
                    rule: Some(i + 1),
                };
            }
        }
        Decision {
            allowed: false,
            rule: None,
        }
    }

    /// `Ok` when allowed; the refusal, explained, when not.
    ///
    /// # Errors
    /// The explanation of a denial.
    pub fn check(
        &self,
        principal: Option<&str>,
        action: Action,
        object: &str,
    ) -> Result<(), String> {
        let d = self.decide(principal, action, object);
        if d.allowed {
            Ok(())
        } else {
            Err(d.explain(principal, action, object))
        }
    }
}

/// `Ok` without ACLs; else as [`Acls::check`].
///
/// # Errors
/// As [`Acls::check`].
pub fn check(
    acls: Option<&Acls>,
    principal: Option<&str>,
    action: Action,
    object: &str,
) -> Result<(), String> {
    acls.map_or(Ok(()), |a| a.check(principal, action, object))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [[rule]]
        action = "run_task_as"
        principals = ["*"]
        objects = ["root"]
        allow = false

        [[rule]]
        action = "run_task_as"
        principals = ["batch"]
        objects = ["*"]

        [[rule]]
        action = "register_framework"
        principals = ["batch"]
        objects = ["batch/*"]
    "#;

    #[test]
    fn the_first_matching_rule_decides_and_the_rest_is_denied() {
        let acls = Acls::parse(FILE).unwrap();
        let d = |p: Option<&str>, a, o: &str| acls.decide(p, a, o);
        assert_eq!(
            d(Some("batch"), Action::RunTaskAs, "root"),
            Decision {
                allowed: false,
                rule: Some(1)
            }
        );
        assert!(d(Some("batch"), Action::RunTaskAs, "nobody").allowed);
        assert!(!d(Some("web"), Action::RunTaskAs, "nobody").allowed);
        assert!(!d(None, Action::RunTaskAs, "nobody").allowed);
        // "a/*" is a and what is under it, not what merely starts with it.
        assert!(d(Some("batch"), Action::RegisterFramework, "batch").allowed);
        assert!(d(Some("batch"), Action::RegisterFramework, "batch/etl").allowed);
        assert!(!d(Some("batch"), Action::RegisterFramework, "batcher").allowed);
        let no = d(Some("batch"), Action::UpdateQuota, "batch");
        assert_eq!(no.rule, None);
        assert!(
            no.explain(Some("batch"), Action::UpdateQuota, "batch")
                .contains("no ACL rule")
        );
    }

    #[test]
    fn bad_files_are_refused_by_what_is_wrong() {
        let e = Acls::parse("[[rule]]\naction = \"fly\"\nprincipals = [\"*\"]\nobjects = [\"*\"]")
            .unwrap_err();
        assert!(e.contains("fly"), "{e}");
        let e = Acls::parse("[[rule]]\naction = \"reserve\"\nprincipals = []\nobjects = [\"*\"]")
            .unwrap_err();
        assert!(e.contains("rule 1"), "{e}");
        let e = Acls::parse(
            "[[rule]]\naction = \"reserve\"\nprincipals = [\"*\"]\nobjects = [\"*\"]\nextra = 1",
        )
        .unwrap_err();
        assert!(e.contains("extra"), "{e}");
    }
}
