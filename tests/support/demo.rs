//! A running `attache demo --json` with every port picked by the kernel, killed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// The demo process and the URLs of its ready line.
pub struct DemoProcess {
    pub child: Child,
    /// The JSON object of the ready line.
    pub urls: Value,
    pub stderr: Arc<Mutex<String>>,
    /// Whatever the demo printed to stdout after its one JSON line (there should be nothing).
    pub more_stdout: Arc<Mutex<String>>,
}

impl DemoProcess {
    /// Starts the demo and waits (bounded) for its ready line.
    pub fn start() -> DemoProcess {
        let mut child = Command::new(super::binary())
            .args(["demo", "--json"])
            .env("ATTACHE_DEMO_PORTS", "auto")
            .env("ATTACHE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let out = child.stdout.take().unwrap();
        let more_stdout = Arc::new(Mutex::new(String::new()));
        let more = more_stdout.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            for line in lines.map_while(Result::ok) {
                let mut m = more.lock().unwrap();
                m.push_str(&line);
                m.push('\n');
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "attache demo --json printed no JSON line:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        let urls: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the first line is not JSON ({e}): {line}"));
        DemoProcess {
            child,
            urls,
            stderr,
            more_stdout,
        }
    }

    /// A base URL from the ready line by JSON pointer (`/admin`, `/shards/india`), without a
    /// trailing slash.
    pub fn base(&self, pointer: &str) -> String {
        let v = self.urls.pointer(pointer).and_then(Value::as_str);
        let v = v.unwrap_or_else(|| panic!("no {pointer} in {}", self.urls));
        v.trim_end_matches('/').to_owned()
    }
}

impl Drop for DemoProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("attache demo log:\n{}", self.stderr.lock().unwrap());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
