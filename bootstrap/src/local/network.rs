//! The node's networks and their containment.
//!
//! Pods get addresses from [`NODE_POD_CIDR`] on the `cni0` bridge, whose own address is
//! the node's ([`NODE_IP`]): the API server, the kubelet and NodePorts listen there, so
//! pods and the host reach them without any address of the machine's real interfaces.
//! Services get addresses from [`SERVICE_CIDR`]. Neither range is routed anywhere but
//! here, and [`contain`] makes sure of it: a chain in the mangle table's POSTROUTING,
//! which every packet leaving the machine passes (forwarded or the host's own, before
//! any source NAT, and which kube-proxy leaves alone), drops whatever comes from or goes
//! to those ranges through an interface other than the bridge or loopback.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use super::Error;

/// The name the node registers as; its kubelet certificate is `system:node:NAME`.
pub const NODE_NAME: &str = "gitops-local";
/// The bridge pods are attached to.
pub const BRIDGE: &str = "cni0";
/// Every pod address of the cluster (kube-proxy's `clusterCIDR`).
pub const POD_CIDR: &str = "10.244.0.0/16";
/// The one node's share of [`POD_CIDR`], handed out by host-local.
pub const NODE_POD_CIDR: &str = "10.244.0.0/24";
/// The bridge's address: the pods' gateway, and the node's InternalIP.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// Service ClusterIPs. A /16, as a real cluster's, so tests may create many Services.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The first address of [`SERVICE_CIDR`], where `kubernetes.default` answers.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The cluster DNS Service's address, which the kubelet writes into pods' resolv.conf.
pub const DNS_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The chain holding the containment rules.
const CONTAIN_CHAIN: &str = "GITOPS-CONTAIN";
/// Chains the node's components create: ours, kube-proxy's and the kubelet's
/// (`KUBE-`), and the CNI plugins' (`CNI-`).
const NODE_CHAIN_PREFIXES: [&str; 3] = ["GITOPS-", "KUBE-", "CNI-"];

/// Creates the bridge with the node's address, so the API server and the kubelet can
/// bind it before the first pod exists; the bridge plugin adopts it.
pub fn create_bridge() -> Result<(), Error> {
    run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    run("ip", &["addr", "add", &format!("{NODE_IP}/24"), "dev", BRIDGE])?;
    run("ip", &["link", "set", BRIDGE, "up"])
}

/// Installs the containment chain first in mangle POSTROUTING.
pub fn contain() -> Result<(), Error> {
    let t = ["-w", "-t", "mangle"];
    run("iptables", &[&t[..], &["-N", CONTAIN_CHAIN]].concat())?;
    let rules: [&[&str]; 5] = [
        &["-o", BRIDGE, "-j", "RETURN"],
        &["-o", "lo", "-j", "RETURN"],
        &["-s", POD_CIDR, "-j", "DROP"],
        &["-d", POD_CIDR, "-j", "DROP"],
        &["-d", SERVICE_CIDR, "-j", "DROP"],
    ];
    for rule in rules {
        let comment = ["-m", "comment", "--comment", "gitops-local: nothing of the node leaves the machine"];
        run("iptables", &[&t[..], &["-A", CONTAIN_CHAIN], rule, &comment].concat())?;
    }
    run("iptables", &[&t[..], &["-I", "POSTROUTING", "1", "-j", CONTAIN_CHAIN]].concat())
}

/// Removes the bridge and every iptables rule and chain of the node (ours, the
/// kubelet's, kube-proxy's, the CNI plugins'), for IPv4 and IPv6. What is not there is
/// skipped.
pub fn remove() -> Result<(), Error> {
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        // The kernel frees a pod's network namespace, and with it its veth, a while
        // after its last process is gone: deleting our end removes both at once.
        let ports = output("ip", &["-o", "link", "show", "master", BRIDGE])?;
        for port in ports.lines().filter_map(|l| l.split(": ").nth(1)?.split('@').next()) {
            // It may go by itself meanwhile.
            if let Err(e) = run("ip", &["link", "delete", port])
                && Path::new("/sys/class/net").join(port).exists()
            {
                return Err(e);
            }
        }
        run("ip", &["link", "delete", BRIDGE])?;
    }
    for program in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle", "raw"] {
            remove_node_chains(program, table)?;
        }
    }
    Ok(())
}

/// Deletes the rules of built-in chains that jump to a node chain, then flushes and
/// deletes the node chains (all flushed first: they jump to each other).
fn remove_node_chains(program: &str, table: &str) -> Result<(), Error> {
    let Ok(listing) = output(program, &["-w", "-t", table, "-S"]) else {
        // A table the kernel lacks (raw without its module) holds nothing of ours.
        return Ok(());
    };
    let is_node_chain = |name: &str| NODE_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p));
    let mut chains = Vec::new();
    for line in listing.lines() {
        let words = split_rule(line);
        match words.first().map(String::as_str) {
            Some("-N") if words.len() > 1 && is_node_chain(&words[1]) => chains.push(words[1].clone()),
            Some("-A") if words.len() > 1 && !is_node_chain(&words[1]) => {
                let jumps = words.windows(2).any(|w| (w[0] == "-j" || w[0] == "-g") && is_node_chain(&w[1]));
                if jumps {
                    let mut delete: Vec<&str> = vec!["-w", "-t", table, "-D"];
                    delete.extend(words[1..].iter().map(String::as_str));
                    run(program, &delete)?;
                }
            }
            _ => {}
        }
    }
    for flag in ["-F", "-X"] {
        for chain in &chains {
            run(program, &["-w", "-t", table, flag, chain])?;
        }
    }
    Ok(())
}

/// Splits a line of `iptables -S` into words; comments are double-quoted.
fn split_rule(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            ' ' if !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            _ => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

pub(crate) fn run(program: &str, args: &[&str]) -> Result<(), Error> {
    output(program, args).map(drop)
}

pub(crate) fn output(program: &str, args: &[&str]) -> Result<String, Error> {
    let out =
        Command::new(program).args(args).output().map_err(|source| Error::Spawn { program: program.into(), source })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_split_as_iptables_prints_them() {
        let line = r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#;
        assert_eq!(
            split_rule(line),
            ["-A", "PREROUTING", "-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]
        );
        assert_eq!(split_rule(r#"-A X --comment """#), ["-A", "X", "--comment", ""]);
    }
}
