//! The names `bindtrace check` takes: `docker:NAME`, `podman:NAME`, `k8s:NAMESPACE/POD`, or a
//! bare name (or id prefix) looked up in every runtime at once.
//!
//! The lookup is generic over a list of [`Named`] workloads so that every source (the Engine
//! APIs, containerd's state directory) is searched the same way.
use std::fmt;

/// What the lookup needs to know of a workload.
pub(crate) trait Named {
    /// `docker`, `podman`, `containerd`: the prefix of its qualified name.
    fn runtime(&self) -> &'static str;
    fn name(&self) -> &str;
    /// The full id (a prefix of at least [`MIN_ID_PREFIX`] characters names it too).
    fn id(&self) -> &str;
    /// Kubernetes namespace and pod name, for a pod's workload.
    fn pod(&self) -> Option<(&str, &str)>;

    /// How an error names it unambiguously: `k8s:NS/POD` for a pod, else `runtime:name`.
    fn qualified(&self) -> String {
        match self.pod() {
            Some((ns, pod)) => format!("k8s:{ns}/{pod}"),
            None => format!("{}:{}", self.runtime(), self.name()),
        }
    }
}

impl Named for crate::sources::docker::Container {
    fn runtime(&self) -> &'static str {
        self.runtime.as_str()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn pod(&self) -> Option<(&str, &str)> {
        Some((self.namespace.as_deref()?, self.pod.as_deref()?))
    }
}

/// Shorter id prefixes are too likely to name several containers by accident.
pub(crate) const MIN_ID_PREFIX: usize = 4;

/// One name given on the command line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Wanted {
    /// `docker:NAME` or `podman:NAME` (also an id prefix): that runtime only.
    InRuntime { runtime: String, name: String },
    /// `k8s:NAMESPACE/POD`.
    Pod { namespace: String, pod: String },
    /// A name or id prefix in any runtime.
    Bare(String),
}

/// Runtimes a `runtime:` prefix may name (`k8s:` is a pod, not a runtime).
const RUNTIMES: [&str; 3] = ["docker", "podman", "containerd"];

impl Wanted {
    pub(crate) fn parse(arg: &str) -> Result<Wanted, String> {
        if let Some(rest) = arg.strip_prefix("k8s:") {
            return match rest.split_once('/') {
                Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
                    Ok(Wanted::Pod { namespace: ns.into(), pod: pod.into() })
                }
                _ => Err(format!("{arg:?}: a pod is named k8s:NAMESPACE/POD, e.g. k8s:default/web")),
            };
        }
        if let Some((prefix, name)) = arg.split_once(':')
            && RUNTIMES.contains(&prefix)
        {
            if name.is_empty() {
                return Err(format!("{arg:?}: give a container name after {prefix}:"));
            }
            return Ok(Wanted::InRuntime {
                runtime: prefix.into(),
                name: name.trim_start_matches('/').into(),
            });
        }
        if arg.is_empty() {
            return Err("an empty container name".into());
        }
        // Docker's names may carry a leading slash (`/web` in the API).
        Ok(Wanted::Bare(arg.trim_start_matches('/').into()))
    }

    fn matches<W: Named>(&self, w: &W) -> bool {
        let by_name =
            |name: &str| w.name() == name || (name.len() >= MIN_ID_PREFIX && w.id().starts_with(name));
        match self {
            Wanted::InRuntime { runtime, name } => w.runtime() == runtime && by_name(name),
            Wanted::Pod { namespace, pod } => w.pod() == Some((namespace.as_str(), pod.as_str())),
            Wanted::Bare(name) => by_name(name),
        }
    }
}

impl fmt::Display for Wanted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wanted::InRuntime { runtime, name } => write!(f, "{runtime}:{name}"),
            Wanted::Pod { namespace, pod } => write!(f, "k8s:{namespace}/{pod}"),
            Wanted::Bare(name) => f.write_str(name),
        }
    }
}

/// Why a name picked no single workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LookupError {
    NotFound(String),
    /// The name and the qualified names of what it matched, sorted.
    Ambiguous(String, Vec<String>),
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LookupError::NotFound(name) => write!(f, "no running container or pod named {name}"),
            LookupError::Ambiguous(name, matches) => write!(
                f,
                "{name} names {} workloads: {}; name one of them so",
                matches.len(),
                matches.join(", ")
            ),
        }
    }
}

/// The workload `wanted` names in `list`. A pod is one workload even when several containers
/// (its pause and app containers) carry its name; anything else must match exactly once.
pub(crate) fn lookup<'a, W: Named>(wanted: &Wanted, list: &'a [W]) -> Result<Vec<&'a W>, LookupError> {
    let found: Vec<&W> = list.iter().filter(|w| wanted.matches(*w)).collect();
    if found.is_empty() {
        return Err(LookupError::NotFound(wanted.to_string()));
    }
    if matches!(wanted, Wanted::Pod { .. }) || found.len() == 1 {
        return Ok(found);
    }
    let mut names: Vec<String> = found.iter().map(|w| w.qualified()).collect();
    names.sort();
    names.dedup();
    if names.len() == 1 {
        // Two containers of one pod, found by their shared name.
        return Ok(found);
    }
    Err(LookupError::Ambiguous(wanted.to_string(), names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct W {
        runtime: &'static str,
        name: &'static str,
        id: &'static str,
        pod: Option<(&'static str, &'static str)>,
    }

    impl Named for W {
        fn runtime(&self) -> &'static str {
            self.runtime
        }
        fn name(&self) -> &str {
            self.name
        }
        fn id(&self) -> &str {
            self.id
        }
        fn pod(&self) -> Option<(&str, &str)> {
            self.pod
        }
    }

    fn list() -> Vec<W> {
        vec![
            W { runtime: "docker", name: "web", id: "aaaa1111", pod: None },
            W { runtime: "podman", name: "web", id: "bbbb2222", pod: None },
            W { runtime: "podman", name: "db", id: "cccc3333", pod: None },
            W { runtime: "containerd", name: "app", id: "dddd4444", pod: Some(("shop", "front")) },
            W { runtime: "containerd", name: "pause", id: "eeee5555", pod: Some(("shop", "front")) },
        ]
    }

    fn ids(found: Vec<&W>) -> Vec<&str> {
        found.iter().map(|w| w.id).collect()
    }

    #[test]
    fn names_parse() {
        let p = |s: &str| Wanted::parse(s);
        assert_eq!(p("web"), Ok(Wanted::Bare("web".into())));
        assert_eq!(p("/web"), Ok(Wanted::Bare("web".into())));
        assert_eq!(p("docker:web"), Ok(Wanted::InRuntime { runtime: "docker".into(), name: "web".into() }));
        assert_eq!(p("podman:/web"), Ok(Wanted::InRuntime { runtime: "podman".into(), name: "web".into() }));
        assert_eq!(p("k8s:shop/front"), Ok(Wanted::Pod { namespace: "shop".into(), pod: "front".into() }));
        // Not a runtime prefix: a name with a colon stays a bare name.
        assert_eq!(p("my:web"), Ok(Wanted::Bare("my:web".into())));
        for bad in ["k8s:front", "k8s:/front", "k8s:shop/", "k8s:a/b/c", "docker:", ""] {
            assert!(p(bad).is_err(), "{bad}");
        }
        assert!(p("k8s:front").unwrap_err().contains("k8s:NAMESPACE/POD"));
    }

    #[test]
    fn qualified_names_pick_their_runtime() {
        let l = list();
        let find = |s: &str| lookup(&Wanted::parse(s).unwrap(), &l).map(ids);
        assert_eq!(find("docker:web"), Ok(vec!["aaaa1111"]));
        assert_eq!(find("podman:web"), Ok(vec!["bbbb2222"]));
        assert_eq!(find("db"), Ok(vec!["cccc3333"]));
        assert_eq!(find("podman:cccc"), Ok(vec!["cccc3333"]), "an id prefix in a runtime");
        assert_eq!(find("docker:db"), Err(LookupError::NotFound("docker:db".into())));
        assert_eq!(find("k8s:shop/front"), Ok(vec!["dddd4444", "eeee5555"]), "one pod, two containers");
        assert_eq!(find("k8s:other/front"), Err(LookupError::NotFound("k8s:other/front".into())));
        assert_eq!(find("aaa"), Err(LookupError::NotFound("aaa".into())), "too short an id prefix");
    }

    #[test]
    fn a_bare_name_in_two_runtimes_is_ambiguous() {
        let l = list();
        let err = lookup(&Wanted::parse("web").unwrap(), &l).unwrap_err();
        assert_eq!(err, LookupError::Ambiguous("web".into(), vec!["docker:web".into(), "podman:web".into()]));
        assert_eq!(err.to_string(), "web names 2 workloads: docker:web, podman:web; name one of them so");
    }
}
