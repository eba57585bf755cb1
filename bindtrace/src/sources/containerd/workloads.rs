//! containerd's tasks as workloads: one per network namespace. A Kubernetes pod is a pause
//! (sandbox) task and its app tasks, all in the sandbox's namespace; it is named by the
//! kubelet's annotations. Otherwise nerdctl's `nerdctl/name`, else the bare task id.
use std::{collections::BTreeMap, net::IpAddr, os::unix::fs::MetadataExt as _};

use super::state::{Task, cut};
use crate::sources::docker::{Binding, Container, Endpoint, PortMapping, Runtime};

/// The kubelet's annotations (containerd's CRI plugin writes them into every task's spec).
const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
/// CRI-O's names for the same (documented, not packaged on Debian 12).
const CRIO_POD_NAME: &str = "io.kubernetes.pod.name";
const CRIO_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// nerdctl's.
const NERDCTL_NAME: &str = "nerdctl/name";
const NERDCTL_PORTS: &str = "nerdctl/ports";

/// The tasks grouped by the network namespace of their init process (tasks whose process is
/// gone, or that share the host's namespace, are left out: they name nothing).
pub(crate) fn group(tasks: &[Task]) -> Vec<Container> {
    let host = inode("/proc/self/ns/net");
    let mut by_ns: BTreeMap<u64, Vec<&Task>> = BTreeMap::new();
    for t in tasks {
        match inode(&format!("/proc/{}/ns/net", t.pid)) {
            Some(ino) if Some(ino) != host => by_ns.entry(ino).or_default().push(t),
            _ => {}
        }
    }
    by_ns
        .into_iter()
        .map(|(ino, tasks)| {
            let mut c = workload(&tasks);
            c.netns_inodes = vec![ino];
            c.networks = addresses(c.pid);
            c
        })
        .collect()
}

fn inode(path: &str) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// What the tasks of one namespace say together, the task saying most first: a pod's
/// annotations, then nerdctl's name, then the id. The pid is the one of the task that names
/// it (a pod's sandbox), whose process lives as long as the namespace is the workload's.
pub(crate) fn workload(tasks: &[&Task]) -> Container {
    let get = |t: &Task, k: &str| t.annotations.get(k).filter(|v| !v.is_empty()).cloned();
    let pod_task = tasks.iter().find(|t| get(t, SANDBOX_NAME).or_else(|| get(t, CRIO_POD_NAME)).is_some());
    let named = pod_task
        .or_else(|| tasks.iter().find(|t| get(t, NERDCTL_NAME).is_some()))
        .or_else(|| tasks.iter().min_by_key(|t| (&t.namespace, &t.id)))
        .expect("a namespace's group has a task");
    let mut c = Container {
        runtime: Runtime::Containerd,
        id: cut(named.id.clone()),
        name: cut(named.id.clone()),
        image: String::new(),
        compose_project: None,
        compose_service: None,
        pod: None,
        namespace: None,
        rootless_daemon: None,
        running: true,
        pid: named.pid,
        started_at: None,
        sandbox_key: None,
        network_mode: "default".into(),
        netns_inodes: Vec::new(),
        networks: Vec::new(),
        ports: Vec::new(),
    };
    if let Some(t) = pod_task {
        let pod = get(t, SANDBOX_NAME).or_else(|| get(t, CRIO_POD_NAME)).map(cut);
        c.namespace = get(t, SANDBOX_NAMESPACE).or_else(|| get(t, CRIO_POD_NAMESPACE)).map(cut);
        c.name = pod.clone().unwrap_or_default();
        c.pod = pod;
        if let Some(sandbox) = get(t, SANDBOX_ID) {
            c.id = cut(sandbox);
        }
        // The app's image says more than the pause image: the first app task's, else any.
        let app = tasks.iter().find(|t| get(t, CONTAINER_TYPE).as_deref() == Some("container"));
        c.image = app.or(Some(t)).and_then(|t| get(t, IMAGE_NAME)).map(cut).unwrap_or_default();
    } else if let Some(name) = get(named, NERDCTL_NAME) {
        c.name = cut(name);
        c.ports = get(named, NERDCTL_PORTS).map(|p| nerdctl_ports(&p)).unwrap_or_default();
    }
    c
}

/// `nerdctl/ports`: `[{"HostPort":8080,"ContainerPort":80,"Protocol":"tcp","HostIP":"0.0.0.0"}]`.
pub(crate) fn nerdctl_ports(json: &str) -> Vec<PortMapping> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Port {
        host_port: u16,
        container_port: u16,
        #[serde(default)]
        protocol: String,
        #[serde(rename = "HostIP", default)]
        host_ip: String,
    }
    let Ok(list) = serde_json::from_str::<Vec<Port>>(json) else { return Vec::new() };
    let mut out: Vec<PortMapping> = Vec::new();
    for p in list {
        let proto = if p.protocol.is_empty() { "tcp".to_owned() } else { p.protocol.to_lowercase() };
        let host_ip: IpAddr = p.host_ip.parse().unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let binding = Binding { host_ip, host_port: p.host_port };
        match out.iter_mut().find(|m| m.container_port == p.container_port && m.proto == proto) {
            Some(m) => m.bindings.push(binding),
            None => {
                out.push(PortMapping { container_port: p.container_port, proto, bindings: vec![binding] })
            }
        }
    }
    out
}

/// The workload's addresses, read inside its namespace (a CNI result is not in the state
/// directory): what forwarded connections arrive at, and what the connect tracker watches.
fn addresses(pid: u32) -> Vec<Endpoint> {
    let Ok(ns) = std::fs::File::open(format!("/proc/{pid}/ns/net")) else { return Vec::new() };
    let found = crate::netns::run_in(std::os::fd::AsFd::as_fd(&ns), crate::netns::prefixes::global_addresses);
    let addrs = found.unwrap_or_default();
    let v4 = addrs.iter().find_map(|a| match a {
        IpAddr::V4(v) => Some(*v),
        _ => None,
    });
    let v6 = addrs.iter().find_map(|a| match a {
        IpAddr::V6(v) => Some(*v),
        _ => None,
    });
    if v4.is_none() && v6.is_none() {
        return Vec::new();
    }
    vec![Endpoint { network: String::new(), network_id: String::new(), ipv4: v4, ipv6: v6 }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, pid: u32, annotations: &[(&str, &str)]) -> Task {
        Task {
            namespace: "k8s.io".into(),
            id: id.into(),
            pid,
            annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    /// Annotations as containerd 1.6's CRI plugin writes them for a pod's two tasks.
    #[test]
    fn a_pod_is_named_by_its_sandbox_and_its_app_s_image() {
        let pause = task(
            "1111",
            10,
            &[
                (CONTAINER_TYPE, "sandbox"),
                (SANDBOX_NAME, "web-0"),
                (SANDBOX_NAMESPACE, "shop"),
                (SANDBOX_ID, "1111"),
                (IMAGE_NAME, "registry.k8s.io/pause:3.6"),
            ],
        );
        let app = task(
            "2222",
            11,
            &[
                (CONTAINER_TYPE, "container"),
                (SANDBOX_NAME, "web-0"),
                (SANDBOX_NAMESPACE, "shop"),
                (SANDBOX_ID, "1111"),
                (IMAGE_NAME, "shop/web:1"),
            ],
        );
        for order in [[&app, &pause], [&pause, &app]] {
            let c = workload(&order);
            assert_eq!((c.name.as_str(), c.id.as_str(), c.image.as_str()), ("web-0", "1111", "shop/web:1"));
            assert_eq!((c.pod.as_deref(), c.namespace.as_deref()), (Some("web-0"), Some("shop")));
            assert_eq!(c.runtime, Runtime::Containerd);
        }
    }

    #[test]
    fn nerdctl_names_then_the_bare_id() {
        let n = task(
            "abc",
            5,
            &[
                (NERDCTL_NAME, "shop-web"),
                (
                    NERDCTL_PORTS,
                    r#"[{"HostPort":8080,"ContainerPort":80,"Protocol":"tcp","HostIP":"0.0.0.0"},{"HostPort":8080,"ContainerPort":80,"Protocol":"tcp","HostIP":"::"}]"#,
                ),
            ],
        );
        let c = workload(&[&n]);
        assert_eq!((c.name.as_str(), c.pod.as_deref(), c.image.as_str()), ("shop-web", None, ""));
        assert_eq!(c.ports.len(), 1);
        assert_eq!(c.ports[0].container_port, 80);
        assert_eq!(c.ports[0].bindings.len(), 2);
        let crio = task("x", 6, &[(CRIO_POD_NAME, "db"), (CRIO_POD_NAMESPACE, "prod")]);
        let c = workload(&[&crio]);
        assert_eq!((c.pod.as_deref(), c.namespace.as_deref()), (Some("db"), Some("prod")));
        let bare = [task("zz", 7, &[]), task("aa", 8, &[])];
        let c = workload(&[&bare[0], &bare[1]]);
        assert_eq!((c.name.as_str(), c.id.as_str(), c.pid), ("aa", "aa", 8));
        assert!(nerdctl_ports("[{").is_empty());
    }
}
