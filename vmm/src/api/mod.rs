//! The VMM control API: Cloud Hypervisor's request set over HTTP/1.1 + JSON on a Unix socket.
//!
//! Three layers, each in one place:
//! - this module: the requests the VM thread serves ([`ApiRequest`]), its answers
//!   ([`ApiResponse`], [`ApiError`]) and the JSON bodies;
//! - [`state`]: the VM life cycle as a pure state machine the VM thread consults;
//! - [`http`]: endpoint table and request parsing (pure), [`server`]: the API thread, which
//!   only turns HTTP requests into [`ApiRequest`]s, sends them through the VM thread's
//!   [`crate::vm::VmHandle`] (channel + eventfd wake-up) and waits for the answer; it never
//!   touches VM state. [`client`] is `vmm remote`.

pub mod client;
pub mod http;
pub mod server;
pub mod state;

use crate::config::VmConfig;
pub use state::VmState;

/// Version the API reports in `vmm.ping`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Requests to the VM thread (Cloud Hypervisor's internal API set).
#[derive(Clone, Debug, PartialEq)]
pub enum ApiRequest {
    /// `vmm.ping`: is the VMM (its VM thread) alive; answers the version.
    VmmPing,
    /// `vmm.shutdown`: stop the VM if any, disconnect every vhost-user device, end the process.
    VmmShutdown,
    /// `vm.create`: store a VM configuration (validated by the VM thread).
    VmCreate(Box<VmConfig>),
    /// `vm.boot`: build the VM from the stored configuration and start it.
    VmBoot,
    /// `vm.delete`: stop the VM if it runs and forget its configuration.
    VmDelete,
    /// `vm.info`: configuration and state.
    VmInfo,
    /// `vm.pause`: stop every vCPU (the guest clock is frozen).
    VmPause,
    /// `vm.resume`: let paused vCPUs run.
    VmResume,
    /// `vm.reboot`: restart the guest in the same process.
    VmReboot,
    /// `vm.shutdown`: stop the guest; the VMM and the configuration stay.
    VmShutdown,
    /// `vm.resize`: change the vCPU count and/or the RAM size.
    VmResize(VmResize),
}

/// Body of `vm.resize` (Cloud Hypervisor's field names).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmResize {
    /// vCPUs wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_vcpus: Option<u8>,
    /// Guest RAM wanted, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_ram: Option<u64>,
}

/// Body of the `vmm.ping` answer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmmPingResponse {
    /// `vmm` version.
    pub version: String,
    /// Process id of the VMM.
    pub pid: u32,
}

impl VmmPingResponse {
    /// The answer for this process.
    pub fn current() -> Self {
        Self {
            version: VERSION.to_string(),
            pid: std::process::id(),
        }
    }
}

/// Body of the `vm.info` answer.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VmInfo {
    /// The configuration (as created, with resizes applied).
    pub config: VmConfig,
    /// Life-cycle state.
    pub state: VmState,
    /// vCPUs the guest has now.
    pub cpus: u8,
    /// Guest RAM in bytes now.
    pub memory: u64,
    /// Number of vhost-user devices.
    pub devices: usize,
    /// Whether every vhost-user daemon is connected (true when not booted).
    pub devices_connected: bool,
    /// How many times the guest was booted in this process (boots + reboots).
    pub boots: u32,
}

/// Successful answers.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiResponse {
    /// The request was carried out; nothing to report (HTTP 204).
    Done,
    /// Answer to [`ApiRequest::VmmPing`].
    Pong(VmmPingResponse),
    /// Answer to [`ApiRequest::VmInfo`].
    Info(Box<VmInfo>),
}

/// Failed requests; [`ApiError::status`] is the HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The VM thread has ended (the VMM is shutting down).
    #[error("the VMM is shutting down")]
    Gone,
    /// The request does not fit the VM's state.
    #[error(transparent)]
    WrongState(#[from] state::StateError),
    /// The configuration in `vm.create` or `vm.resize` is not acceptable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The VM could not carry the request out (e.g. the kernel does not load).
    #[error("{0}")]
    Failed(String),
    /// The request is understood but this VMM cannot do it yet.
    #[error("not supported yet: {0}")]
    NotSupported(String),
}

impl ApiError {
    /// HTTP status code for this error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::Gone => 503,
            ApiError::WrongState(state::StateError::NoVm) => 404,
            ApiError::WrongState(_) => 409,
            ApiError::InvalidConfig(_) => 400,
            ApiError::Failed(_) => 500,
            ApiError::NotSupported(_) => 501,
        }
    }
}

/// JSON body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_statuses() {
        assert_eq!(ApiError::WrongState(state::StateError::NoVm).status(), 404);
        assert_eq!(
            ApiError::WrongState(state::StateError::NotPaused(VmState::Running)).status(),
            409
        );
        assert_eq!(ApiError::InvalidConfig("x".into()).status(), 400);
        assert_eq!(ApiError::Failed("x".into()).status(), 500);
        assert_eq!(ApiError::NotSupported("x".into()).status(), 501);
        assert_eq!(ApiError::Gone.status(), 503);
        assert_eq!(
            ApiError::NotSupported("memory unplug".into()).to_string(),
            "not supported yet: memory unplug"
        );
    }
}
