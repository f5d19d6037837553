use crate::DeviceInfo;

/// The `--print-capabilities` document defined by the vhost-user spec
/// (`VHostUserBackendCapabilities` in QEMU's vhost-user.json).
pub fn capabilities_json(info: &DeviceInfo) -> String {
    serde_json::json!({
        "type": info.device_type,
        "features": info.capabilities,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_spec_json() {
        let info = DeviceInfo {
            name: "vhost-user-block",
            device_type: "block",
            capabilities: &["read-only-mode", "blk-file"],
        };
        let v: serde_json::Value = serde_json::from_str(&capabilities_json(&info)).unwrap();
        assert_eq!(v["type"], "block");
        assert_eq!(v["features"][0], "read-only-mode");
        assert_eq!(v["features"][1], "blk-file");
    }
}
