//! `[[principal]]` blocks: uid -> key/cert ID globs (spec common-http §7.2).

use std::collections::HashMap;

use serde::Deserialize;

/// One `[[principal]]` block. keyd names the list `keys`, certd names it `certs`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Principal {
    pub uid: u32,
    #[serde(alias = "certs")]
    pub keys: Vec<String>,
}

/// All principals folded into uid -> patterns.
#[derive(Clone, Debug, Default)]
pub struct Principals {
    by_uid: HashMap<u32, Vec<String>>,
}

impl Principals {
    pub fn new(principals: &[Principal]) -> Self {
        let mut by_uid: HashMap<u32, Vec<String>> = HashMap::new();
        for p in principals {
            by_uid.entry(p.uid).or_default().extend(p.keys.iter().cloned());
        }
        Principals { by_uid }
    }

    /// uid 0 is always authorized; others need a pattern matching the whole ID.
    pub fn is_authorized(&self, uid: u32, id: &str) -> bool {
        if uid == 0 {
            return true;
        }
        self.by_uid
            .get(&uid)
            .is_some_and(|patterns| patterns.iter().any(|p| glob_match(p, id)))
    }
}

/// `*` = any sequence (including empty), `?` = exactly one character, everything else literal
/// and case-sensitive; no escaping, no classes. Iterative with one backtrack point, so the cost
/// is O(pattern × text) in the worst case, never exponential.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("module-*", "module-a"));
        assert!(glob_match("module-*", "module-"));
        assert!(!glob_match("module-*", "Module-a"));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("a?c", "aёc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(!glob_match("example", "example1"));
        assert!(glob_match("[x]", "[x]"));
        assert!(!glob_match("", "a"));
        assert!(glob_match(&"*a".repeat(20), &"a".repeat(40)));
        assert!(!glob_match(&"*a".repeat(20), &format!("{}b", "a".repeat(40))));
    }

    #[test]
    fn principals() {
        let p = Principals::new(&[
            Principal { uid: 1000, keys: vec!["example".into()] },
            Principal { uid: 1000, keys: vec!["mod-*".into()] },
        ]);
        assert!(p.is_authorized(0, "whatever"));
        assert!(p.is_authorized(1000, "example"));
        assert!(p.is_authorized(1000, "mod-x"));
        assert!(!p.is_authorized(1000, "other"));
        assert!(!p.is_authorized(1001, "example"));
    }
}
