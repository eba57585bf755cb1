//! The parts of the Docker Engine API's JSON that bindtrace reads, and their conversion into
//! the inventory. Requests carry no version prefix, so the daemon answers in its own current
//! version; every field used here has the same shape from API 1.24 (Docker 1.12) to today's.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::MetadataExt,
    path::PathBuf,
};

use serde::Deserialize;

use crate::bounds;

use super::{Binding, Container, Endpoint, Network, PortMapping, Runtime};

/// `GET /version`: podman's compatible API lists a component named "Podman Engine"; Docker's
/// lists "Engine".
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct VersionJson {
    #[serde(default)]
    pub(crate) components: Option<Vec<ComponentJson>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ComponentJson {
    #[serde(default)]
    pub(crate) name: String,
}

impl VersionJson {
    pub(crate) fn runtime(&self) -> Runtime {
        let podman = self.components.iter().flatten().any(|c| c.name == "Podman Engine");
        if podman { Runtime::Podman } else { Runtime::Docker }
    }
}

/// `GET /libpod/networks/json` (podman): the bridge is `network_interface`.
#[derive(Debug, Deserialize)]
pub(crate) struct LibpodNetworkJson {
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) driver: String,
    #[serde(default)]
    pub(crate) network_interface: String,
}

impl From<&LibpodNetworkJson> for Network {
    fn from(n: &LibpodNetworkJson) -> Network {
        let bridge =
            (n.driver == "bridge" && !n.network_interface.is_empty()).then(|| n.network_interface.clone());
        Network { id: n.id.clone(), bridge }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ContainerSummary {
    #[serde(rename = "Id")]
    pub(crate) id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ContainerJson {
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) state: State,
    #[serde(default)]
    pub(crate) config: Config,
    #[serde(default)]
    pub(crate) host_config: HostConfig,
    #[serde(default)]
    pub(crate) network_settings: NetworkSettings,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct State {
    #[serde(default)]
    pub(crate) running: bool,
    #[serde(default)]
    pub(crate) pid: u32,
    #[serde(default)]
    pub(crate) started_at: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Config {
    #[serde(default)]
    pub(crate) image: String,
    #[serde(default)]
    pub(crate) labels: Option<HashMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct HostConfig {
    #[serde(default)]
    pub(crate) network_mode: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct NetworkSettings {
    #[serde(default)]
    pub(crate) sandbox_key: String,
    #[serde(default)]
    pub(crate) ports: Option<HashMap<String, Option<Vec<PortBindingJson>>>>,
    #[serde(default)]
    pub(crate) networks: Option<HashMap<String, EndpointJson>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct PortBindingJson {
    #[serde(rename = "HostIp", default)]
    pub(crate) host_ip: String,
    #[serde(rename = "HostPort", default)]
    pub(crate) host_port: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct EndpointJson {
    #[serde(rename = "NetworkID", default)]
    pub(crate) network_id: String,
    #[serde(rename = "IPAddress", default)]
    pub(crate) ip_address: String,
    #[serde(rename = "GlobalIPv6Address", default)]
    pub(crate) global_ipv6_address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct NetworkJson {
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) driver: String,
    #[serde(default)]
    pub(crate) options: Option<HashMap<String, String>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct EventJson {
    #[serde(rename = "Type", default)]
    pub(crate) kind: String,
    #[serde(rename = "Action", default)]
    pub(crate) action: String,
    #[serde(rename = "Actor", default)]
    pub(crate) actor: Actor,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Actor {
    #[serde(rename = "ID", default)]
    pub(crate) id: String,
    #[serde(rename = "Attributes", default)]
    pub(crate) attributes: Option<HashMap<String, String>>,
}

impl EventJson {
    pub(crate) fn attribute(&self, key: &str) -> Option<&str> {
        self.actor.attributes.as_ref()?.get(key).map(String::as_str)
    }
}

/// The bridge Docker made for a network of the bridge driver.
pub(crate) fn bridge_name(n: &NetworkJson) -> Option<String> {
    if n.driver != "bridge" {
        return None;
    }
    if let Some(name) = n.options.as_ref().and_then(|o| o.get("com.docker.network.bridge.name"))
        && !name.is_empty()
    {
        return Some(name.clone());
    }
    Some(format!("br-{}", n.id.get(..12).unwrap_or(&n.id)))
}

impl From<&NetworkJson> for Network {
    fn from(n: &NetworkJson) -> Network {
        Network { id: n.id.clone(), bridge: bridge_name(n) }
    }
}

/// The inode of the namespace at `path`, only when it is one: a rootless engine's SandboxKey,
/// seen from outside its mount namespace, is the empty file its namespace is mounted on.
pub(crate) fn nsfs_inode(path: &str) -> Option<u64> {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: a valid C string and a zeroed statfs for the call to fill.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut fs) } != 0 || fs.f_type as i64 != NSFS_MAGIC {
        return None;
    }
    inode_of(path)
}

fn inode_of(path: &str) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

fn label(s: String) -> String {
    bounds::cut(s, bounds::LABEL_BYTES).0
}

/// `"8000/tcp"` -> (8000, "tcp").
fn parse_port_key(key: &str) -> Option<(u16, String)> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    Some((port.parse().ok()?, proto.to_owned()))
}

impl ContainerJson {
    // Long because it maps the inspect document field by field; nothing in it branches much.
    pub(crate) fn into_container(self, runtime: Runtime) -> Container {
        let labels = self.config.labels.unwrap_or_default();
        let mut ports: Vec<PortMapping> = self
            .network_settings
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(key, bindings)| {
                let (container_port, proto) = parse_port_key(&key)?;
                let bindings: Vec<Binding> = bindings
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|b| {
                        let host_ip: IpAddr = if b.host_ip.is_empty() {
                            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                        } else {
                            b.host_ip.parse().ok()?
                        };
                        Some(Binding { host_ip, host_port: b.host_port.parse().ok()? })
                    })
                    .collect();
                Some(PortMapping { container_port, proto, bindings })
            })
            .collect();
        ports.sort_by(|a, b| (a.container_port, &a.proto).cmp(&(b.container_port, &b.proto)));
        let mut networks: Vec<Endpoint> = self
            .network_settings
            .networks
            .unwrap_or_default()
            .into_iter()
            .map(|(name, e)| Endpoint {
                network: name,
                network_id: e.network_id,
                ipv4: e.ip_address.parse().ok(),
                ipv6: e.global_ipv6_address.parse().ok(),
            })
            .collect();
        networks.sort_by(|a, b| a.network.cmp(&b.network));
        let sandbox_key = Some(self.network_settings.sandbox_key).filter(|s| !s.is_empty());
        let mut netns_inodes = Vec::new();
        // Both ways to the namespace: the sandbox handle (exists without any process) and the
        // main process's /proc entry (when the handle is not visible from here).
        if let Some(ino) = sandbox_key.as_deref().and_then(nsfs_inode) {
            netns_inodes.push(ino);
        }
        if self.state.pid > 0
            && let Some(ino) = inode_of(&format!("/proc/{}/ns/net", self.state.pid))
            && !netns_inodes.contains(&ino)
        {
            netns_inodes.push(ino);
        }
        Container {
            runtime,
            // Names, images and labels are the container owner's to choose: kept within bounds.
            name: label(self.name.trim_start_matches('/').to_owned()),
            image: label(self.config.image),
            compose_project: labels.get("com.docker.compose.project").cloned().map(label),
            compose_service: labels.get("com.docker.compose.service").cloned().map(label),
            pod: None,
            namespace: None,
            rootless_daemon: None,
            running: self.state.running,
            pid: self.state.pid,
            started_at: humantime::parse_rfc3339_weak(&self.state.started_at).ok(),
            sandbox_key: sandbox_key.map(PathBuf::from),
            network_mode: self.host_config.network_mode,
            netns_inodes,
            networks,
            ports,
            id: self.id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A namespace file counts, a plain file (what a rootless engine's SandboxKey is from
    /// outside its mount namespace) does not.
    #[test]
    fn only_a_namespace_file_gives_a_namespace_inode() {
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_eq!(nsfs_inode("/proc/self/ns/net"), Some(own));
        let file = std::env::temp_dir().join(format!("bindtrace-nsfs-{}", std::process::id()));
        std::fs::write(&file, "").unwrap();
        assert_eq!(nsfs_inode(file.to_str().unwrap()), None);
        std::fs::remove_file(&file).unwrap();
        assert_eq!(nsfs_inode("/nonexistent/sandbox"), None);
    }

    /// Trimmed from a real `GET /containers/{id}/json` of Docker 20.10 (API 1.41).
    const INSPECT: &str = r#"{
        "Id": "845422a94cb48e2fe935caa44c301a2bab8698e1985c6aee631b4545505eb6b1",
        "Name": "/btdk-explore1",
        "State": {"Status": "running", "Running": true, "Pid": 1731, "StartedAt": "2026-11-26T11:56:58.514272978Z"},
        "Config": {"Image": "btdk-explore:1", "Labels": {"com.docker.compose.project": "shop", "com.docker.compose.service": "web"}},
        "HostConfig": {"NetworkMode": "default", "PortBindings": {"8000/tcp": [{"HostIp": "", "HostPort": "8000"}]}},
        "NetworkSettings": {
            "SandboxKey": "/var/run/docker/netns/b2fe5d1d8f0f",
            "Ports": {"8000/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8000"}, {"HostIp": "::", "HostPort": "8000"}], "9000/tcp": null, "53/udp": [{"HostIp": "127.0.0.1", "HostPort": "5353"}]},
            "Networks": {"bridge": {"NetworkID": "0009e84c43871a829910d7e3972fb17eb4860362bb0c3f01d1e79e64f21d8ad5", "IPAddress": "172.17.0.2", "GlobalIPv6Address": "", "Gateway": "172.17.0.1"}}
        }
    }"#;

    #[test]
    fn inspect_becomes_a_container() {
        let c: ContainerJson = serde_json::from_str(INSPECT).unwrap();
        let c = c.into_container(Runtime::Docker);
        assert_eq!(c.name, "btdk-explore1");
        assert_eq!(c.short_id(), "845422a94cb4");
        assert_eq!(c.image, "btdk-explore:1");
        assert_eq!(c.compose_project.as_deref(), Some("shop"));
        assert_eq!(c.compose_service.as_deref(), Some("web"));
        assert!(c.running);
        assert!(c.started_at.is_some());
        assert_eq!(c.ports.len(), 3);
        let p = c.port(8000, "tcp").unwrap();
        assert_eq!(p.bindings.len(), 2);
        assert_eq!(p.bindings[1].host_ip, "::".parse::<IpAddr>().unwrap());
        assert!(c.port(9000, "tcp").unwrap().bindings.is_empty());
        assert_eq!(c.port(53, "udp").unwrap().bindings[0].host_port, 5353);
        assert_eq!(c.networks[0].ipv4, Some("172.17.0.2".parse().unwrap()));
        assert_eq!(c.networks[0].ipv6, None);
    }

    /// Trimmed from podman 4.3.1's compatible `GET /containers/{id}/json` (netavark, the default
    /// network): the network id is its name, the sandbox a handle under /run/netns.
    const PODMAN_INSPECT: &str = r#"{
        "Id": "eec440ab71f22bc6414527175c5e2512136875e8e2823bfdb419b040f68890d8",
        "Name": "/bt-podexp1",
        "State": {"Status": "running", "Running": true, "Pid": 15286, "StartedAt": "2026-12-03T11:55:54.731207818Z"},
        "Config": {"Image": "localhost/bt-podexp:busybox", "Labels": {}},
        "HostConfig": {"NetworkMode": "bridge", "PortBindings": {"8000/tcp": [{"HostIp": "", "HostPort": "18666"}]}},
        "NetworkSettings": {
            "Ports": {"8000/tcp": [{"HostIp": "", "HostPort": "18666"}]},
            "SandboxKey": "/run/netns/netns-d9ae2c00-c709-2422-249c-d92923c1689b",
            "IPAddress": "10.88.0.5",
            "Networks": {"podman": {"NetworkID": "podman", "IPAddress": "10.88.0.5", "GlobalIPv6Address": ""}}
        }
    }"#;

    #[test]
    fn podman_inspect_becomes_a_container() {
        let c: ContainerJson = serde_json::from_str(PODMAN_INSPECT).unwrap();
        let c = c.into_container(Runtime::Podman);
        assert_eq!(c.runtime, Runtime::Podman);
        assert_eq!(c.name, "bt-podexp1");
        assert!(c.owns_netns());
        let p = c.port(8000, "tcp").unwrap();
        assert_eq!(
            p.bindings,
            vec![Binding { host_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED), host_port: 18666 }]
        );
        assert_eq!(c.address(), Some("10.88.0.5".parse().unwrap()));
    }

    #[test]
    fn runtime_from_version() {
        let podman: VersionJson = serde_json::from_str(
            r#"{"Platform":{"Name":"linux/amd64/debian-12"},"Components":[{"Name":"Podman Engine","Version":"4.3.1"},{"Name":"Conmon"}],"Version":"4.3.1","ApiVersion":"1.41"}"#,
        )
        .unwrap();
        assert_eq!(podman.runtime(), Runtime::Podman);
        let docker: VersionJson = serde_json::from_str(
            r#"{"Components":[{"Name":"Engine","Version":"20.10.24"},{"Name":"containerd"}],"Version":"20.10.24"}"#,
        )
        .unwrap();
        assert_eq!(docker.runtime(), Runtime::Docker);
        // Docker before 1.13 has no Components at all.
        let old: VersionJson = serde_json::from_str(r#"{"Version":"1.12.6"}"#).unwrap();
        assert_eq!(old.runtime(), Runtime::Docker);
    }

    /// Podman 4.3.1's `GET /v4.0.0/libpod/networks/json`, trimmed.
    #[test]
    fn podman_bridge_is_its_network_interface() {
        let list: Vec<LibpodNetworkJson> = serde_json::from_str(
            r#"[{"name":"podman","id":"2f259bab93aaaaa2542ba43ef33eb990d0999ee1b9924b557b7be53c0b7a1bb9","driver":"bridge","network_interface":"podman0","subnets":[{"subnet":"10.88.0.0/16","gateway":"10.88.0.1"}]},
                {"name":"mac","id":"77","driver":"macvlan","network_interface":"eth0"}]"#,
        )
        .unwrap();
        assert_eq!(Network::from(&list[0]).bridge.as_deref(), Some("podman0"));
        assert_eq!(Network::from(&list[1]).bridge, None);
    }

    #[test]
    fn bridge_names() {
        let n: NetworkJson = serde_json::from_str(
            r#"{"Name":"bridge","Id":"0009e84c4387abc","Driver":"bridge","Options":{"com.docker.network.bridge.name":"docker0"}}"#,
        )
        .unwrap();
        assert_eq!(bridge_name(&n).as_deref(), Some("docker0"));
        let n: NetworkJson = serde_json::from_str(
            r#"{"Name":"app","Id":"5c1f0e2d9a8b7c6d5e4f","Driver":"bridge","Options":{}}"#,
        )
        .unwrap();
        assert_eq!(bridge_name(&n).as_deref(), Some("br-5c1f0e2d9a8b"));
        let n: NetworkJson =
            serde_json::from_str(r#"{"Name":"host","Id":"b574513bc67c","Driver":"host"}"#).unwrap();
        assert_eq!(bridge_name(&n), None);
    }

    #[test]
    fn events_parse() {
        let e: EventJson = serde_json::from_str(
            r#"{"status":"connect","Type":"network","Action":"connect","Actor":{"ID":"net1","Attributes":{"container":"c1","name":"app"}},"scope":"local","time":1,"timeNano":1}"#,
        )
        .unwrap();
        assert_eq!(e.kind, "network");
        assert_eq!(e.attribute("container"), Some("c1"));
    }
}
