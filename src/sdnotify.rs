//! systemd readiness notification (`Type=notify`): a few lines of the sd_notify protocol, written
//! by hand rather than through a crate — one datagram per state change to the Unix socket named
//! by `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
//!
//! Without `NOTIFY_SOCKET` (not under systemd) every call does nothing. A failed send is logged
//! and otherwise ignored: notification never stops the gateway.

/// Sends `state` (newline-separated `KEY=value` lines) to `$NOTIFY_SOCKET`, if set. Returns
/// whether a datagram was sent.
pub fn notify(state: &str) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    match send(&socket, state) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "could not notify systemd (NOTIFY_SOCKET)");
            false
        }
    }
}

#[cfg(unix)]
fn send(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let sock = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    match bytes.split_first() {
        Some((b'@', name)) => {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)?;
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = name;
                return Err(std::io::Error::other(
                    "abstract socket names exist only on Linux",
                ));
            }
        }
        Some((b'/', _)) => {
            sock.send_to(state.as_bytes(), std::path::Path::new(socket))?;
        }
        _ => {
            return Err(std::io::Error::other(
                "NOTIFY_SOCKET is neither an absolute path nor an @abstract name",
            ));
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn send(_socket: &std::ffi::OsStr, _state: &str) -> std::io::Result<()> {
    Ok(())
}

/// `CLOCK_MONOTONIC` in microseconds, as `MONOTONIC_USEC=` wants it with `RELOADING=1`.
#[cfg(unix)]
pub fn monotonic_usec() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// Not on Unix: no systemd.
#[cfg(not(unix))]
pub fn monotonic_usec() -> u64 {
    0
}

/// Readiness, once the listeners accept connections.
pub fn ready(status: &str) -> bool {
    notify(&format!(
        "READY=1\nSTATUS={status}\nMAINPID={}\n",
        std::process::id()
    ))
}

/// A reload begins (SIGHUP).
pub fn reloading() -> bool {
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the configuration\n",
        monotonic_usec()
    ))
}

/// The drain begins (SIGTERM).
pub fn stopping() -> bool {
    notify("STOPPING=1\nSTATUS=draining in-flight requests\n")
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn sends_to_paths_and_abstract_names() {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1\n").unwrap();
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        let name = format!("tokengate-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1\n").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");

        assert!(send(std::ffi::OsStr::new("relative.sock"), "X=1\n").is_err());
        assert!(monotonic_usec() > 0);
    }
}
