//! virtio-console control messages (virtio spec 5.3.6.2, `struct virtio_console_control`),
//! exchanged on the control queues when VIRTIO_CONSOLE_F_MULTIPORT is negotiated.

/// Size of `struct virtio_console_control`: le32 id, le16 event, le16 value.
pub const CONTROL_LEN: usize = 8;

/// Driver -> device: the driver is ready (value 1) or failed (0).
pub const DEVICE_READY: u16 = 0;
/// Device -> driver: a port was added.
pub const DEVICE_ADD: u16 = 1;
/// Device -> driver: a port was removed.
pub const DEVICE_REMOVE: u16 = 2;
/// Driver -> device: the port was set up (value 1) or not (0).
pub const PORT_READY: u16 = 3;
/// Device -> driver: the port is a console (becomes an hvc device).
pub const CONSOLE_PORT: u16 = 4;
/// Device -> driver: new console size, `le16 cols, le16 rows` after the header.
pub const RESIZE: u16 = 5;
/// Both ways: the port was opened (value 1) or closed (0) on the sender's side.
pub const PORT_OPEN: u16 = 6;
/// Device -> driver: the port's name follows the header.
pub const PORT_NAME: u16 = 7;

/// One control message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    /// Port number.
    pub id: u32,
    /// One of the event constants above.
    pub event: u16,
    /// Event argument.
    pub value: u16,
}

impl Control {
    /// Decode the header at the start of `bytes`; `None` when it is too short.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let b: &[u8; CONTROL_LEN] = bytes.get(..CONTROL_LEN)?.try_into().ok()?;
        Some(Self {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        })
    }

    /// Encode the message followed by `extra` bytes (a port name, a size).
    pub fn encode(&self, extra: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(CONTROL_LEN + extra.len());
        v.extend_from_slice(&self.id.to_le_bytes());
        v.extend_from_slice(&self.event.to_le_bytes());
        v.extend_from_slice(&self.value.to_le_bytes());
        v.extend_from_slice(extra);
        v
    }
}

/// A device -> driver `event` for port `id` with value 1 (added, a console, open, named),
/// followed by `extra` bytes (the name).
pub fn announce(id: u32, event: u16, extra: &[u8]) -> Vec<u8> {
    Control {
        id,
        event,
        value: 1,
    }
    .encode(extra)
}

/// `RESIZE` for port `id`: `le16 cols, le16 rows` after the header (virtio spec 5.3.6.2).
/// Linux read them the other way round until 2025 ("virtio_console: fix order of dimensions in
/// RESIZE message", backported to stable kernels); the spec's order is the one that lasts.
pub fn resize(id: u32, cols: u16, rows: u16) -> Vec<u8> {
    let mut size = cols.to_le_bytes().to_vec();
    size.extend_from_slice(&rows.to_le_bytes());
    Control {
        id,
        event: RESIZE,
        value: 0,
    }
    .encode(&size)
}

/// Human name of an event, for logs.
pub fn event_name(event: u16) -> &'static str {
    match event {
        DEVICE_READY => "DEVICE_READY",
        DEVICE_ADD => "DEVICE_ADD",
        DEVICE_REMOVE => "DEVICE_REMOVE",
        PORT_READY => "PORT_READY",
        CONSOLE_PORT => "CONSOLE_PORT",
        RESIZE => "RESIZE",
        PORT_OPEN => "PORT_OPEN",
        PORT_NAME => "PORT_NAME",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_short_messages() {
        let c = Control {
            id: 3,
            event: PORT_OPEN,
            value: 1,
        };
        let bytes = c.encode(b"");
        assert_eq!(bytes, [3, 0, 0, 0, 6, 0, 1, 0]);
        assert_eq!(Control::parse(&bytes), Some(c));
        assert_eq!(Control::parse(&bytes[..7]), None);
        assert_eq!(resize(0, 132, 40), [0, 0, 0, 0, 5, 0, 0, 0, 132, 0, 40, 0]);
    }
}
