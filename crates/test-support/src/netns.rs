//! A network namespace joined to the test's own by a veth pair with private /30 addresses, for
//! clients that die silently: cutting the link sends no FIN and no RST. Traffic stays inside the
//! two namespaces. Needs root and iproute2 (`ip`); without them [`Netns::create`] panics with a
//! message saying so (the tests that need it never skip).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A namespace with one veth link to the test's namespace. Removed on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    outer_if: String,
    inner_if: String,
    /// The test's end of the link: bind servers here.
    pub outer: Ipv4Addr,
    /// The namespace's end of the link.
    pub inner: Ipv4Addr,
}

impl Netns {
    /// Creates the namespace and its link. Panics, saying why, without root or iproute2.
    pub fn create() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{:x}{n}", pid % 0xfffff);
        // Private addresses, unique per process and namespace: 10.(200+n).(pid % 256).{1,2}/30.
        let b = (200 + n % 50) as u8;
        let c = (pid % 256) as u8;
        let ns = Netns {
            name: format!("tether-dp-{tag}"),
            outer_if: format!("tdo{tag}"),
            inner_if: format!("tdi{tag}"),
            outer: Ipv4Addr::new(10, b, c, 1),
            inner: Ipv4Addr::new(10, b, c, 2),
        };
        let setup = || -> Result<(), String> {
            ip(&["netns", "add", &ns.name])?;
            ip(&[
                "link",
                "add",
                &ns.outer_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns.inner_if,
                "netns",
                &ns.name,
            ])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/30", ns.outer),
                "dev",
                &ns.outer_if,
            ])?;
            ip(&["link", "set", &ns.outer_if, "up"])?;
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{}/30", ns.inner),
                "dev",
                &ns.inner_if,
            ])?;
            ip(&["-n", &ns.name, "link", "set", &ns.inner_if, "up"])?;
            ip(&["-n", &ns.name, "link", "set", "lo", "up"])
        };
        if let Err(e) = setup() {
            drop(ns);
            panic!(
                "a dead-peer test needs root and iproute2 to create a network namespace and a \
                 veth pair, and could not: {e}"
            );
        }
        ns
    }

    /// Connects to `addr` from inside the namespace.
    pub fn connect(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpStream> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path)?;
            // This thread only: the socket is created in the namespace and keeps it.
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the connecting thread panicked")))
    }

    /// Cuts the client's link: nothing more leaves or reaches it, and no FIN or RST is sent.
    pub fn cut(&self) -> Result<(), String> {
        ip(&["-n", &self.name, "link", "set", &self.inner_if, "down"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.outer_if]);
    }
}
