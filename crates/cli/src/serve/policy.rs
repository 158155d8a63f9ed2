//! What a client of `psbridge serve` may run, per profile: the profile's `allow` globs (matched
//! case-insensitively against every command of a pipeline) and `allow_scripts`. A refusal names the
//! rule that refused it.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use crate::profile::Profile;

/// How to write an allowlist, for the message that refuses a profile without one.
pub const HOW_TO_ALLOW: &str = "add an allowlist to the profile, for example `allow = [\"Get-*\", \"Set-Mailbox\"]` \
    (globs, case-insensitive; `allow_scripts = true` lets clients run scripts), or start the server with --allow-all";

/// Checks one `allow` pattern as the configuration is read.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.trim().is_empty() {
        return Err("a pattern is empty".to_owned());
    }
    glob(pattern).map(drop).map_err(|error| format!("{pattern:?} is not a glob ({})", error.kind()))
}

fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern).case_insensitive(true).literal_separator(false).build()
}

/// A profile's rules for clients.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `None`: everything is allowed (`--allow-all`, or the built-in `simulated` profile).
    allow: Option<(Vec<String>, GlobSet)>,
    allow_scripts: bool,
}

/// Why a request was refused: the rule, in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl Policy {
    /// Everything allowed, scripts included.
    pub fn allow_all() -> Policy {
        Policy { allow: None, allow_scripts: true }
    }

    /// The rules of `profile`; everything for the built-in `simulated` profile or with `all` (--allow-all).
    /// A profile from the file with no `allow` list is refused (the message says how to write one).
    pub fn of(profile: &Profile, all: bool) -> Result<Policy, String> {
        let name = profile.name.as_deref().unwrap_or_default();
        if all || (name == crate::config::SIMULATED && profile.spec.allow.is_none()) {
            return Ok(Policy::allow_all());
        }
        let Some(patterns) = &profile.spec.allow else {
            return Err(format!("profile {name} has no allowlist, so serve would let any client run anything: {HOW_TO_ALLOW}"));
        };
        let mut set = GlobSetBuilder::new();
        for pattern in patterns {
            set.add(glob(pattern).map_err(|error| format!("profile {name}: allow {pattern:?}: {error}"))?);
        }
        let set = set.build().map_err(|error| format!("profile {name}: allow: {error}"))?;
        Ok(Policy { allow: Some((patterns.clone(), set)), allow_scripts: profile.spec.allow_scripts.unwrap_or(false) })
    }

    /// Whether a command by this name may run.
    pub fn check_command(&self, name: &str) -> Result<(), Refusal> {
        match &self.allow {
            None => Ok(()),
            Some((_, set)) if set.is_match(name) => Ok(()),
            Some((patterns, _)) => Err(Refusal(format!(
                "{name} is not allowed by the profile's allowlist (allow = [{}])",
                patterns.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// Whether scripts may run.
    pub fn check_script(&self) -> Result<(), Refusal> {
        if self.allow_scripts {
            Ok(())
        } else {
            Err(Refusal("scripts are not allowed by the profile (allow_scripts = false)".to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProfileSpec;

    fn profile(name: &str, allow: Option<&[&str]>, scripts: Option<bool>) -> Profile {
        let spec = ProfileSpec { allow: allow.map(|a| a.iter().map(|p| (*p).to_owned()).collect()), allow_scripts: scripts, ..Default::default() };
        Profile { name: Some(name.to_owned()), spec }
    }

    #[test]
    fn globs_match_case_insensitively_and_refusals_name_the_rule() {
        let policy = Policy::of(&profile("p", Some(&["Get-*", "Set-Mailbox"]), None), false).unwrap();
        assert!(policy.check_command("get-mailbox").is_ok());
        assert!(policy.check_command("Set-Mailbox").is_ok());
        let refused = policy.check_command("Remove-Mailbox").unwrap_err().to_string();
        assert!(refused.contains("Remove-Mailbox") && refused.contains(r#"allow = ["Get-*", "Set-Mailbox"]"#), "{refused}");
        assert!(policy.check_script().unwrap_err().to_string().contains("allow_scripts = false"));
        assert!(Policy::of(&profile("p", Some(&[]), Some(true)), false).unwrap().check_script().is_ok());
    }

    #[test]
    fn a_profile_without_an_allowlist_is_refused_unless_everything_is_allowed() {
        let error = Policy::of(&profile("contoso", None, None), false).unwrap_err();
        assert!(error.contains("profile contoso has no allowlist") && error.contains("allow = [") && error.contains("--allow-all"), "{error}");
        assert!(Policy::of(&profile("contoso", None, None), true).unwrap().check_command("Remove-Mailbox").is_ok());
        let simulated = Policy::of(&profile(crate::config::SIMULATED, None, None), false).unwrap();
        assert!(simulated.check_command("Remove-Mailbox").is_ok() && simulated.check_script().is_ok());
    }
}
