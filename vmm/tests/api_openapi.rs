//! `vmm/api/openapi.yaml` against the server: the same endpoints and methods, every status
//! the server answers is described there, and the JSON the server reads and writes has the
//! properties the schemas list (and, where the schema says `additionalProperties: false`, the
//! server refuses others).

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::api::client::{request, Reply};
use vmm::api::http::{Method, ENDPOINTS};
use yaml_rust2::{Yaml, YamlLoader};

fn spec() -> Yaml {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("api/openapi.yaml");
    let text = std::fs::read_to_string(&path).expect("read openapi.yaml");
    let mut docs = YamlLoader::load_from_str(&text).expect("openapi.yaml is valid YAML");
    assert_eq!(docs.len(), 1);
    docs.remove(0)
}

fn keys(y: &Yaml) -> BTreeSet<String> {
    y.as_hash()
        .unwrap_or_else(|| panic!("not a mapping: {y:?}"))
        .keys()
        .map(|k| k.as_str().expect("string key").to_string())
        .collect()
}

fn schema<'a>(spec: &'a Yaml, name: &str) -> &'a Yaml {
    let s = &spec["components"]["schemas"][name];
    assert!(!s.is_badvalue(), "schema {name} is missing");
    s
}

fn properties(spec: &Yaml, name: &str) -> BTreeSet<String> {
    keys(&schema(spec, name)["properties"])
}

fn required(spec: &Yaml, name: &str) -> BTreeSet<String> {
    schema(spec, name)["required"]
        .as_vec()
        .map(|v| v.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The statuses an operation documents (resolving nothing: the keys are enough).
fn statuses(spec: &Yaml, name: &str, method: Method) -> BTreeSet<u16> {
    let op = &spec["paths"][format!("/{name}").as_str()][method.as_str().to_lowercase().as_str()];
    assert!(
        !op.is_badvalue(),
        "{} /{name} is not in openapi.yaml",
        method.as_str()
    );
    keys(&op["responses"])
        .iter()
        .map(|s| s.parse().expect("numeric status"))
        .collect()
}

struct Vmm(Child, PathBuf);

impl Vmm {
    fn start(socket: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .arg("--api-socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start vmm");
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "the API socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self(child, socket.to_path_buf())
    }

    fn send(&self, method: Method, name: &str, body: Option<&str>) -> Reply {
        request(&self.1, method, name, body.map(str::as_bytes)).expect("API request")
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_endpoints_are_the_ones_described() {
    let spec = spec();
    assert_eq!(
        spec["servers"][0]["url"].as_str(),
        Some("http://localhost/api/v1")
    );
    let mut described = BTreeSet::new();
    for path in keys(&spec["paths"]) {
        for method in keys(&spec["paths"][path.as_str()]) {
            described.insert((
                path.trim_start_matches('/').to_string(),
                method.to_uppercase(),
            ));
        }
    }
    let served: BTreeSet<_> = ENDPOINTS
        .iter()
        .map(|e| (e.name.to_string(), e.method.as_str().to_string()))
        .collect();
    assert_eq!(described, served);
}

#[test]
fn every_answer_of_the_server_is_described() {
    let spec = spec();
    let dir = tempfile::tempdir().unwrap();
    let vmm = Vmm::start(&dir.path().join("api.sock"));
    let kernel = dir.path().join("kernel");
    std::fs::write(&kernel, b"x").unwrap();
    let config = format!(r#"{{"kernel": "{}", "serial": "off"}}"#, kernel.display());
    let check = |method: Method, name: &str, body: Option<&str>| -> Reply {
        let r = vmm.send(method, name, body);
        assert!(
            statuses(&spec, name, method).contains(&r.status),
            "{name} answered {} ({}), which openapi.yaml does not list",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        if r.status >= 400 {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            let got: BTreeSet<_> = v.as_object().unwrap().keys().cloned().collect();
            assert_eq!(got, properties(&spec, "Error"));
        }
        r
    };
    // Without a VM, then with one (not booted: no /dev/kvm needed), each endpoint once.
    for ep in ENDPOINTS.iter().filter(|e| e.name != "vmm.shutdown") {
        let body = match ep.name {
            "vm.create" => Some("{\"kernel\": 1}"),
            "vm.resize" => Some(r#"{"desired_vcpus": 2}"#),
            _ => None,
        };
        check(ep.method, ep.name, body);
    }
    // The example in the description parses; its files do not exist here: 400, not 5xx.
    let example = &spec["paths"]["/vm.create"]["put"]["requestBody"]["content"]["application/json"]
        ["example"];
    let example = serde_json::to_string(&yaml_to_json(example)).unwrap();
    let r = check(Method::Put, "vm.create", Some(&example));
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("kernel image /var/lib/vmm/vmlinuz"));
    assert_eq!(check(Method::Put, "vm.create", Some(&config)).status, 204);
    for ep in ENDPOINTS.iter().filter(|e| e.name != "vmm.shutdown") {
        let body = match ep.name {
            "vm.create" => Some(config.as_str()),
            "vm.resize" => Some(r#"{"desired_ram": 1073741824}"#),
            _ => None,
        };
        check(ep.method, ep.name, body);
    }
    // Wrong methods and unknown paths answer JSON errors too (405 and 404 are not per
    // operation in the description; their bodies are still `Error`).
    let r = vmm.send(Method::Get, "vm.pause", None);
    assert_eq!(r.status, 405);

    // The bodies: vm.info and vmm.ping have exactly the described properties.
    assert_eq!(check(Method::Put, "vm.create", Some(&config)).status, 204);
    let info: serde_json::Value =
        serde_json::from_slice(&check(Method::Get, "vm.info", None).body).unwrap();
    let got: BTreeSet<_> = info.as_object().unwrap().keys().cloned().collect();
    assert_eq!(got, properties(&spec, "VmInfo"));
    assert_eq!(required(&spec, "VmInfo"), got);
    let states: Vec<_> = schema(&spec, "VmState")["enum"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    assert!(states.contains(&info["state"].as_str().unwrap().to_string()));
    for s in ["Created", "Running", "Paused", "Shutdown"] {
        let v =
            serde_json::to_value(serde_json::from_value::<vmm::api::VmState>(s.into()).unwrap())
                .unwrap();
        assert!(states.contains(&v.as_str().unwrap().to_string()), "{s}");
    }
    assert_eq!(states.len(), 4);
    let written: BTreeSet<_> = info["config"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(written, properties(&spec, "VmConfig"));
    assert_eq!(
        required(&spec, "VmConfig"),
        BTreeSet::from(["kernel".to_string()])
    );
    let ping: serde_json::Value =
        serde_json::from_slice(&check(Method::Get, "vmm.ping", None).body).unwrap();
    let got: BTreeSet<_> = ping.as_object().unwrap().keys().cloned().collect();
    assert_eq!(got, properties(&spec, "VmmPingResponse"));

    // Every described property of the request bodies is accepted, an extra one refused.
    assert_eq!(check(Method::Put, "vm.delete", None).status, 204);
    let dev_sock = dir.path().join("dev.sock");
    let device = serde_json::json!({
        "kind": "fs", "socket": dev_sock, "server": true, "num_queues": 1, "queue_size": 128,
        "tag": "t",
    });
    let full = serde_json::json!({
        "kernel": kernel, "initramfs": kernel, "cmdline": "console=ttyS0", "cpus": 1,
        "max_cpus": 2, "memory": "64M", "max_memory": "192M", "hugepages": false,
        "serial": "off", "devices": [device], "no_reboot": true,
    });
    let sent: BTreeSet<_> = full.as_object().unwrap().keys().cloned().collect();
    assert_eq!(sent, properties(&spec, "VmConfig"));
    let mut dev_keys: BTreeSet<_> = device.as_object().unwrap().keys().cloned().collect();
    dev_keys.insert("mac".into()); // net only; sent below
    assert_eq!(dev_keys, properties(&spec, "VhostUserDeviceConfig"));
    assert_eq!(
        check(Method::Put, "vm.create", Some(&full.to_string())).status,
        204
    );
    let info: serde_json::Value =
        serde_json::from_slice(&check(Method::Get, "vm.info", None).body).unwrap();
    let dev_written: BTreeSet<_> = info["config"]["devices"][0]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(dev_written, properties(&spec, "VhostUserDeviceConfig"));
    assert_eq!(info["config"]["max_memory"], 192 << 20);
    assert_eq!(check(Method::Put, "vm.delete", None).status, 204);
    let net = serde_json::json!({"kernel": kernel, "serial": "off", "devices": [{
        "kind": "net", "socket": dev_sock, "server": true, "mac": "52:54:00:12:34:56"}]});
    assert_eq!(
        check(Method::Put, "vm.create", Some(&net.to_string())).status,
        204
    );
    for (name, with_extra) in [
        (
            "VmConfig",
            serde_json::json!({"kernel": kernel, "extra": 1}).to_string(),
        ),
        (
            "VmResize",
            r#"{"desired_vcpus": 1, "extra": 1}"#.to_string(),
        ),
    ] {
        assert_eq!(
            schema(&spec, name)["additionalProperties"].as_bool(),
            Some(false),
            "{name}"
        );
        let ep = if name == "VmConfig" {
            "vm.create"
        } else {
            "vm.resize"
        };
        let r = vmm.send(Method::Put, ep, Some(&with_extra));
        assert_eq!(r.status, 400, "{name}");
        assert!(String::from_utf8_lossy(&r.body).contains("unknown field `extra`"));
    }
    let resize: BTreeSet<_> = serde_json::to_value(vmm::api::VmResize {
        desired_vcpus: Some(1),
        desired_ram: Some(1 << 30),
    })
    .unwrap()
    .as_object()
    .unwrap()
    .keys()
    .cloned()
    .collect();
    assert_eq!(resize, properties(&spec, "VmResize"));

    assert_eq!(check(Method::Put, "vmm.shutdown", None).status, 204);
}

fn yaml_to_json(y: &Yaml) -> serde_json::Value {
    use serde_json::Value;
    match y {
        Yaml::String(s) | Yaml::Real(s) => Value::String(s.clone()),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), yaml_to_json(v)))
                .collect(),
        ),
        _ => Value::Null,
    }
}
