//! Telling systemd the parent is ready (`Type=notify`): one `READY=1`
//! datagram to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract
//! namespace), sent once the control socket listens and the persistent
//! instances are made, so that units ordered after the parent (the instance
//! template's `umdevctl create`) find it answering.

use std::os::unix::net::UnixDatagram;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?}: {1}")]
    Send(String, std::io::Error),
}

/// Sends `state` (e.g. `READY=1`) to the service manager, if there is one.
pub fn notify(state: &str) -> Result<(), NotifyError> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(path) => notify_to(&path, state),
        None => Ok(()),
    }
}

/// Sends `state` to the notification socket `path`.
pub fn notify_to(path: &std::ffi::OsStr, state: &str) -> Result<(), NotifyError> {
    let name = path.to_string_lossy().into_owned();
    let err = |e| NotifyError::Send(name.clone(), e);
    let socket = UnixDatagram::unbound().map_err(err)?;
    match name.strip_prefix('@') {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr =
                std::os::unix::net::SocketAddr::from_abstract_name(abstract_name).map_err(err)?;
            socket.send_to_addr(state.as_bytes(), &addr).map_err(err)?;
        }
        None => {
            socket.send_to(state.as_bytes(), path).map_err(err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_path_and_abstract_sockets() {
        let path = std::env::temp_dir().join(format!("umdev-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_file(&path);

        use std::os::linux::net::SocketAddrExt;
        let name = format!("umdev-notify-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(format!("@{name}").as_ref(), "READY=1").unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
