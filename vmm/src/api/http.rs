//! The HTTP face of the API: the endpoint table, request parsing and answer bodies.
//!
//! Pure functions of (method, path, body), so that every bad request is unit-tested without a
//! socket. Endpoints follow Cloud Hypervisor: `GET` for queries, `PUT` for actions, under
//! `/api/v1/`; successful actions answer 204, queries 200 with JSON; errors answer 4xx/5xx
//! with `{"error": "..."}`.

use super::{ApiError, ApiRequest, ApiResponse, ErrorBody, VmResize};
use crate::config::VmConfig;

/// Every endpoint path starts with this.
pub const API_PREFIX: &str = "/api/v1/";

/// Largest request body accepted (a VM configuration is well under 4 KiB).
pub const MAX_BODY: usize = 64 << 10;

/// HTTP methods the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Queries.
    Get,
    /// Actions.
    Put,
}

impl Method {
    /// Upper-case name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// One endpoint: `/api/v1/<name>` with `method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Name after the prefix, e.g. `vm.boot`.
    pub name: &'static str,
    /// The method it takes.
    pub method: Method,
}

/// Every endpoint the server answers (checked against `vmm/api/openapi.yaml` by a test).
pub const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        name: "vmm.ping",
        method: Method::Get,
    },
    Endpoint {
        name: "vmm.shutdown",
        method: Method::Put,
    },
    Endpoint {
        name: "vm.create",
        method: Method::Put,
    },
    Endpoint {
        name: "vm.boot",
        method: Method::Put,
    },
    Endpoint {
        name: "vm.delete",
        method: Method::Put,
    },
    Endpoint {
        name: "vm.info",
        method: Method::Get,
    },
    Endpoint {
        name: "vm.pause",
        method: Method::Put,
    },
    Endpoint {
        name: "vm.resume",
        method: Method::Put,
    },
    Endpoint {
        name: "vm.reboot",
        method: Method::Put,
    },
    Endpoint {
        name: "vm.shutdown",
        method: Method::Put,
    },
    Endpoint {
        name: "vm.resize",
        method: Method::Put,
    },
];

/// A request the API thread answers itself, without asking the VM thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpError {
    /// HTTP status.
    pub status: u16,
    /// Message for the `error` field.
    pub message: String,
    /// For 405: the method the endpoint takes (sent in `Allow`).
    pub allow: Option<Method>,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            allow: None,
        }
    }
}

/// An answer ready to be written: status and JSON body (`None`: no body).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Option<String>,
    /// `Allow` header for 405.
    pub allow: Option<Method>,
}

/// Find the endpoint for `url` (path, optional query ignored).
fn endpoint(method: &str, url: &str) -> Result<Endpoint, HttpError> {
    let path = url.split_once('?').map_or(url, |(p, _)| p);
    let name = path.strip_prefix(API_PREFIX).ok_or_else(|| {
        HttpError::new(
            404,
            format!("unknown path {path}: endpoints are under {API_PREFIX}"),
        )
    })?;
    let ep = ENDPOINTS
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| HttpError::new(404, format!("unknown endpoint {path}")))?;
    if method != ep.method.as_str() {
        return Err(HttpError {
            status: 405,
            message: format!("{} takes {}, not {method}", ep.name, ep.method.as_str()),
            allow: Some(ep.method),
        });
    }
    Ok(*ep)
}

/// A JSON body for `name`, or 400 saying what is wrong with it.
fn json<T: serde::de::DeserializeOwned>(name: &str, body: &[u8]) -> Result<T, HttpError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(HttpError::new(400, format!("{name} needs a JSON body")));
    }
    serde_json::from_slice(body)
        .map_err(|e| HttpError::new(400, format!("{name}: invalid JSON body: {e}")))
}

/// Endpoints without a body accept an empty one or an empty JSON object.
fn no_body(name: &str, body: &[u8]) -> Result<(), HttpError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) {
        Ok(m) if m.is_empty() => Ok(()),
        _ => Err(HttpError::new(400, format!("{name} takes no body"))),
    }
}

/// Turn an HTTP request into the request for the VM thread.
pub fn parse_request(method: &str, url: &str, body: &[u8]) -> Result<ApiRequest, HttpError> {
    let ep = endpoint(method, url)?;
    if body.len() > MAX_BODY {
        return Err(HttpError::new(
            413,
            format!(
                "body of {} bytes is over the {MAX_BODY}-byte limit",
                body.len()
            ),
        ));
    }
    let request = match ep.name {
        "vm.create" => ApiRequest::VmCreate(Box::new(json::<VmConfig>(ep.name, body)?)),
        "vm.resize" => {
            let resize: VmResize = json(ep.name, body)?;
            if resize.desired_vcpus.is_none() && resize.desired_ram.is_none() {
                return Err(HttpError::new(
                    400,
                    "vm.resize: give desired_vcpus and/or desired_ram",
                ));
            }
            if resize.desired_vcpus == Some(0) {
                return Err(HttpError::new(
                    400,
                    "vm.resize: desired_vcpus must be at least 1",
                ));
            }
            ApiRequest::VmResize(resize)
        }
        name => {
            no_body(name, body)?;
            match name {
                "vmm.ping" => ApiRequest::VmmPing,
                "vmm.shutdown" => ApiRequest::VmmShutdown,
                "vm.boot" => ApiRequest::VmBoot,
                "vm.delete" => ApiRequest::VmDelete,
                "vm.info" => ApiRequest::VmInfo,
                "vm.pause" => ApiRequest::VmPause,
                "vm.resume" => ApiRequest::VmResume,
                "vm.reboot" => ApiRequest::VmReboot,
                "vm.shutdown" => ApiRequest::VmShutdown,
                other => {
                    // ENDPOINTS and this match are kept together; a miss is a bug here.
                    return Err(HttpError::new(
                        500,
                        format!("endpoint {other} has no handler"),
                    ));
                }
            }
        }
    };
    Ok(request)
}

fn error_body(message: String) -> Option<String> {
    serde_json::to_string(&ErrorBody { error: message }).ok()
}

impl From<HttpError> for Answer {
    fn from(e: HttpError) -> Self {
        Answer {
            status: e.status,
            body: error_body(e.message),
            allow: e.allow,
        }
    }
}

/// The HTTP answer for what the VM thread replied.
pub fn answer(reply: Result<ApiResponse, ApiError>) -> Answer {
    let json = |v: Result<String, serde_json::Error>| match v {
        Ok(s) => Answer {
            status: 200,
            body: Some(s),
            allow: None,
        },
        Err(e) => Answer {
            status: 500,
            body: error_body(format!("cannot encode the answer: {e}")),
            allow: None,
        },
    };
    match reply {
        Ok(ApiResponse::Done) => Answer {
            status: 204,
            body: None,
            allow: None,
        },
        Ok(ApiResponse::Pong(p)) => json(serde_json::to_string(&p)),
        Ok(ApiResponse::Info(i)) => json(serde_json::to_string(&i)),
        Err(e) => Answer {
            status: e.status(),
            body: error_body(e.to_string()),
            allow: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::state::{StateError, VmState};

    fn err(method: &str, url: &str, body: &str) -> HttpError {
        parse_request(method, url, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn every_endpoint_parses() {
        for ep in ENDPOINTS {
            let body = match ep.name {
                "vm.create" => r#"{"kernel": "/k"}"#,
                "vm.resize" => r#"{"desired_vcpus": 2}"#,
                _ => "",
            };
            let url = format!("{API_PREFIX}{}", ep.name);
            assert!(
                parse_request(ep.method.as_str(), &url, body.as_bytes()).is_ok(),
                "{}",
                ep.name
            );
        }
        assert_eq!(
            parse_request("GET", "/api/v1/vmm.ping", b""),
            Ok(ApiRequest::VmmPing)
        );
        assert_eq!(
            parse_request("PUT", "/api/v1/vm.pause?now=1", b" {} "),
            Ok(ApiRequest::VmPause)
        );
    }

    #[test]
    fn create_takes_the_vm_config() {
        let body = r#"{"kernel": "/boot/vmlinuz", "cpus": 2, "memory": "1G",
            "serial": {"file": "/tmp/s"},
            "devices": [{"kind": "block", "socket": "/run/b.sock"}]}"#;
        let Ok(ApiRequest::VmCreate(c)) =
            parse_request("PUT", "/api/v1/vm.create", body.as_bytes())
        else {
            panic!("vm.create did not parse");
        };
        assert_eq!(c.kernel.to_str(), Some("/boot/vmlinuz"));
        assert_eq!((c.cpus, c.memory), (2, 1 << 30));
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.devices[0].queue_size, 256);
    }

    #[test]
    fn unknown_paths_and_methods() {
        let e = err("GET", "/api/v1/vm.nope", "");
        assert_eq!(e.status, 404);
        assert!(e.message.contains("vm.nope"), "{}", e.message);
        assert_eq!(err("GET", "/", "").status, 404);
        assert_eq!(err("GET", "/api/v2/vmm.ping", "").status, 404);
        assert_eq!(err("GET", "/api/v1/", "").status, 404);
        let e = err("GET", "/api/v1/vm.boot", "");
        assert_eq!((e.status, e.allow), (405, Some(Method::Put)));
        assert_eq!(e.message, "vm.boot takes PUT, not GET");
        assert_eq!(err("POST", "/api/v1/vm.info", "").status, 405);
        assert_eq!(err("DELETE", "/api/v1/vm.delete", "").status, 405);
    }

    #[test]
    fn bad_bodies_are_400() {
        for (url, body, says) in [
            ("vm.create", "", "needs a JSON body"),
            ("vm.create", "{", "invalid JSON"),
            ("vm.create", "[1,2]", "invalid JSON"),
            ("vm.create", r#"{"cpus": 2}"#, "missing field `kernel`"),
            (
                "vm.create",
                r#"{"kernel": "/k", "vcpus": 2}"#,
                "unknown field `vcpus`",
            ),
            (
                "vm.create",
                r#"{"kernel": "/k", "cpus": "two"}"#,
                "invalid type",
            ),
            (
                "vm.create",
                r#"{"kernel": "/k", "cpus": 300}"#,
                "invalid value",
            ),
            (
                "vm.create",
                r#"{"kernel": "/k", "memory": "12Q"}"#,
                "invalid memory size",
            ),
            ("vm.create", r#"{"kernel": "/k", "memory": -1}"#, "invalid"),
            (
                "vm.create",
                r#"{"kernel": "/k", "serial": "tty"}"#,
                "unknown variant",
            ),
            (
                "vm.create",
                r#"{"kernel": "/k", "devices": [{"kind": "block"}]}"#,
                "missing field `socket`",
            ),
            (
                "vm.create",
                r#"{"kernel": "/k", "devices": [{"kind": "gpu", "socket": "/s"}]}"#,
                "unknown variant `gpu`",
            ),
            (
                "vm.create",
                r#"{"kernel": "/k", "devices": [{"kind": "net", "socket": "/s", "x": 1}]}"#,
                "unknown field `x`",
            ),
            ("vm.resize", "", "needs a JSON body"),
            ("vm.resize", "{}", "desired_vcpus and/or desired_ram"),
            ("vm.resize", r#"{"desired_vcpus": 0}"#, "at least 1"),
            (
                "vm.resize",
                r#"{"desired_cpus": 2}"#,
                "unknown field `desired_cpus`",
            ),
            ("vm.resize", r#"{"desired_ram": "big"}"#, "invalid type"),
            ("vm.resize", r#"{"desired_vcpus": 256}"#, "invalid value"),
            ("vm.boot", "now", "takes no body"),
            ("vm.pause", r#"{"a": 1}"#, "takes no body"),
        ] {
            let e = err(
                if url == "vm.info" { "GET" } else { "PUT" },
                &format!("{API_PREFIX}{url}"),
                body,
            );
            assert_eq!(e.status, 400, "{url} {body}: {}", e.message);
            assert!(e.message.contains(says), "{url} {body}: {}", e.message);
        }
        assert_eq!(
            err("GET", "/api/v1/vmm.ping", "x").message,
            "vmm.ping takes no body"
        );
    }

    #[test]
    fn oversized_bodies_are_413() {
        let big = format!(
            r#"{{"kernel": "/k", "cmdline": "{}"}}"#,
            "x".repeat(MAX_BODY)
        );
        assert_eq!(err("PUT", "/api/v1/vm.create", &big).status, 413);
    }

    #[test]
    fn answers() {
        assert_eq!(answer(Ok(ApiResponse::Done)).status, 204);
        assert_eq!(answer(Ok(ApiResponse::Done)).body, None);
        let a = answer(Ok(ApiResponse::Pong(crate::api::VmmPingResponse {
            version: "1.2.3".into(),
            pid: 7,
        })));
        assert_eq!(a.status, 200);
        assert_eq!(a.body.as_deref(), Some(r#"{"version":"1.2.3","pid":7}"#));
        let a = answer(Err(ApiError::WrongState(StateError::NotPaused(
            VmState::Running,
        ))));
        assert_eq!(a.status, 409);
        assert_eq!(
            a.body.as_deref(),
            Some(r#"{"error":"cannot resume: the VM is running, not paused"}"#)
        );
        let a: Answer = err("GET", "/api/v1/vm.boot", "").into();
        assert_eq!(a.allow, Some(Method::Put));
        assert_eq!(
            a.body.as_deref(),
            Some(r#"{"error":"vm.boot takes PUT, not GET"}"#)
        );
    }
}
