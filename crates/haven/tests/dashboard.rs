//! `haven dashboard`: the REST API and web page over a real lab, driven with plain
//! HTTP as a script or a browser would.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use common::{HAVEN, Lab, lab_device, lock, svc_home, wait_for};

/// The gateway process, killed when the test ends.
struct Gateway {
    child: Child,
    addr: String,
    token: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start(lab: &Lab) -> Gateway {
        let mut child = Command::new(HAVEN)
            .args(["dashboard", "--listen", "127.0.0.1:0"])
            .env("HAVEN_CONFIG", &lab.client)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start haven dashboard");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("first line");
        // "Haven dashboard: http://127.0.0.1:PORT/?token=TOKEN"
        let url = line
            .trim()
            .strip_prefix("Haven dashboard: http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        let (addr, token) = url.split_once("/?token=").expect("url with token");
        Gateway {
            addr: addr.to_string(),
            token: token.to_string(),
            child,
        }
    }

    /// One HTTP/1.1 request; returns (status, headers, body).
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> (u16, String, String) {
        let mut s = TcpStream::connect(&self.addr).expect("connect to the dashboard");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        s.write_all(req.as_bytes()).expect("send");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read response");
        let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        (status, head.to_string(), body.to_string())
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let auth = self.bearer();
        let (code, _, body) = self.request("GET", path, &[("Authorization", &auth)], None);
        (code, serde_json::from_str(&body).expect("JSON body"))
    }

    fn post(&self, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let auth = self.bearer();
        let (code, _, body) = self.request("POST", path, &[("Authorization", &auth)], body);
        (code, serde_json::from_str(&body).expect("JSON body"))
    }
}

#[test]
fn the_rest_api_shows_the_cluster_and_moves_a_resource_and_the_page_needs_the_token() {
    let _serial = lock();
    let lab = Lab::up();
    lab.configure(&lab_device()(&lab));
    let home = svc_home(&lab);
    let gw = Gateway::start(&lab);

    // No token, a wrong token: refused, saying what to send.
    let (code, _, body) = gw.request("GET", "/api/v1/status", &[], None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("Authorization: Bearer"), "{body}");
    let (code, _, _) = gw.request(
        "GET",
        "/api/v1/status",
        &[("Authorization", "Bearer 0123456789abcdef")],
        None,
    );
    assert_eq!(code, 401);
    let (code, _, page) = gw.request("GET", "/", &[], None);
    assert_eq!(code, 401);
    assert!(
        !page.contains("<script"),
        "the page is served without a token"
    );

    // The printed URL trades the token for a cookie; the cookie opens the page.
    let (code, head, _) = gw.request("GET", &format!("/?token={}", gw.token), &[], None);
    assert_eq!(code, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a cookie is set");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().expect("name=value");
    let (code, _, page) = gw.request("GET", "/", &[("Cookie", pair)], None);
    assert_eq!(code, 200);
    assert!(page.contains("<title>Haven</title>") && page.contains("/api/v1/"));

    // Status: the lab's three nodes and svc where it really runs.
    let (code, s) = gw.get("/api/v1/status");
    assert_eq!(code, 200, "{s}");
    let names: Vec<&str> = s["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, ["n1", "n2", "n3"]);
    // The cluster's view catches up with the processes within a monitor interval.
    wait_for("status to show svc where it runs", || {
        let (code, s) = gw.get("/api/v1/status");
        assert_eq!(code, 200, "{s}");
        let svc = s["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .find(|r| r["id"] == "svc")
            .expect("svc in status")
            .clone();
        (svc["running_on"] == serde_json::json!([home])).then_some(())
    });

    let (code, cfg) = gw.get("/api/v1/config");
    assert_eq!(code, 200);
    assert!(cfg["text"].as_str().expect("text").contains("id = \"svc\""));
    let (code, fence) = gw.get("/api/v1/fence");
    assert_eq!(code, 200, "{fence}");
    assert_eq!(
        fence["members"].as_array().map(Vec::len),
        Some(3),
        "{fence}"
    );

    // Move svc: it really runs on the other node afterwards.
    let target = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != home)
        .expect("another node");
    let (code, r) = gw.post(
        "/api/v1/resources/svc/move",
        Some(&format!("{{\"node\": \"{target}\"}}")),
    );
    assert_eq!(code, 200, "{r}");
    assert!(r["config_version"].as_u64().is_some(), "{r}");
    wait_for("svc to run on the move target", || {
        (lab.running("svc") == [target]).then_some(())
    });

    // Bad requests are refused with the reason, and change nothing.
    let (code, r) = gw.post(
        "/api/v1/resources/svc/move",
        Some("{\"node\": \"nowhere\"}"),
    );
    assert_eq!(code, 400, "{r}");
    assert!(
        r["error"].as_str().expect("error").contains("nowhere"),
        "{r}"
    );
    let (code, r) = gw.post("/api/v1/resources/svc/move", Some("{}"));
    assert_eq!(code, 400, "{r}");
    let (code, r) = gw.post("/api/v1/nodes/nosuch/standby", None);
    assert_eq!(code, 400, "{r}");
    assert!(
        r["error"].as_str().expect("error").contains("nosuch"),
        "{r}"
    );
    let (code, r) = gw.post("/api/v1/nodes/n1/reboot", None);
    assert_eq!(code, 404, "{r}");
    let (code, r) = gw.post(&format!("/api/v1/fence/{home}/ack"), None);
    assert_eq!(code, 409, "{r}");
    assert_eq!(lab.running("svc"), [target]);

    // Standby through the API empties the node.
    let (code, r) = gw.post(&format!("/api/v1/nodes/{target}/standby"), None);
    assert_eq!(code, 200, "{r}");
    wait_for("svc to leave the standby node", || {
        let on = lab.running("svc");
        (on.len() == 1 && on[0] != target).then_some(())
    });
}

#[test]
fn the_dashboard_refuses_to_listen_beyond_loopback() {
    let out = Command::new(HAVEN)
        .args([
            "dashboard",
            "--listen",
            "0.0.0.0:0",
            "--config",
            "/nonexistent.toml",
        ])
        .output()
        .expect("run haven");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--listen 0.0.0.0:0") && err.contains("loopback"),
        "{err}"
    );
}
