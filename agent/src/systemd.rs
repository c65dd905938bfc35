//! systemd readiness (`sd_notify`): one datagram to `$NOTIFY_SOCKET`, no library needed.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1`) if the agent runs under systemd with `Type=notify`; a no-op
/// otherwise. Failures are logged, never fatal: readiness is a courtesy.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let bytes = target.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            // An abstract socket name.
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&target)?,
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    // Setting the variable `notify` reads is the point of the test; edition 2024 makes that
    // `unsafe` because another thread could read the environment at the same time.
    #[allow(unsafe_code)]
    #[test]
    fn sends_a_datagram_to_the_notify_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("notify");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // SAFETY: this is the only test that touches NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        super::notify("READY=1");
        // SAFETY: as above.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
