//! The MQTT side against a real mosquitto broker on a loopback port, with real daemons.

mod common;
mod daemon;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use common::*;
use daemon::*;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// A mosquitto process on a loopback port (kept across restarts).
struct Broker {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    persistence: bool,
}

impl Broker {
    fn start() -> Broker {
        Broker::with(false)
    }

    /// A broker that keeps sessions and queued messages across a graceful restart (SIGTERM
    /// writes them to disk): a persistent watcher misses nothing published while it reconnects.
    fn persistent() -> Broker {
        Broker::with(true)
    }

    fn with(persistence: bool) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut b = Broker {
            child: None,
            port,
            dir,
            persistence,
        };
        b.launch();
        b
    }

    fn launch(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let persistence = if self.persistence {
            // Started as root, mosquitto drops to its own user before it saves the sessions.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
            format!("persistence true\npersistence_location {}/\n", self.dir.path().display())
        } else {
            "persistence false\n".to_owned()
        };
        std::fs::write(
            &conf,
            format!("listener {} 127.0.0.1\nallow_anonymous true\n{persistence}", self.port),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed (apt-get install mosquitto)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the broker with SIGTERM, which lets it save its sessions, and waits for it.
    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: a signal to our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            c.wait().unwrap();
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A received message.
#[derive(Debug, Clone)]
struct Msg {
    topic: String,
    body: Value,
    correlation: Option<Bytes>,
}

/// A test client subscribed to `filters`; messages arrive on the returned channel.
async fn watch(broker: &Broker, name: &str, filters: &[&str]) -> (AsyncClient, mpsc::UnboundedReceiver<Msg>) {
    let mut opts = MqttOptions::new(name, "127.0.0.1", broker.port);
    opts.set_max_packet_size(Some(32 * 1024 * 1024));
    let (client, mut el) = AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready = Some(ready_tx);
    let subs: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
    let c = client.clone();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for f in &subs {
                        c.subscribe(f.clone(), QoS::AtLeastOnce).await.unwrap();
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let body = serde_json::from_slice(&p.payload)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&p.payload).into_owned()));
                    let msg = Msg {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        body,
                        correlation: p.properties.and_then(|pr| pr.correlation_data),
                    };
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .expect("subscribed")
        .unwrap();
    (client, rx)
}

/// The next message matching `pred`, skipping others; panics after `secs`.
async fn next(rx: &mut mpsc::UnboundedReceiver<Msg>, secs: u64, pred: impl Fn(&Msg) -> bool) -> Msg {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let m = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("expected message did not arrive")
            .expect("watcher stopped");
        if pred(&m) {
            return m;
        }
    }
}

/// A watcher with a persistent session (clean start off, an hour's expiry) subscribed to
/// `filter` once: on a [`Broker::persistent`] it receives every message published to the
/// filter, across broker restarts. Messages arrive as (topic, JSON body).
async fn persistent_watch(broker: &Broker, name: &str, filter: &str) -> mpsc::UnboundedReceiver<(String, Value)> {
    let mut opts = MqttOptions::new(name, "127.0.0.1", broker.port);
    opts.set_clean_start(false).set_session_expiry_interval(Some(3600));
    let (client, mut el) = AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel::<(String, Value)>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready = Some(ready_tx);
    let filter = filter.to_owned();
    tokio::spawn(async move {
        let mut subscribed = false;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) if !subscribed => {
                    client.subscribe(filter.clone(), QoS::AtLeastOnce).await.unwrap();
                    subscribed = true;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let body = serde_json::from_slice(&p.payload)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&p.payload).into_owned()));
                    if tx.send((String::from_utf8_lossy(&p.topic).into_owned(), body)).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(c))) => {
                    assert!(c.session_present, "the broker lost the watcher's session: {c:?}")
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx).await.expect("subscribed").unwrap();
    rx
}

/// The node's stats message, asked for now.
async fn stats_of(broker: &Broker, node: &str) -> Value {
    let (c, mut rx) = watch(broker, &format!("stats-{node}"), &[&format!("removebg/{node}/stats")]).await;
    c.publish(format!("removebg/{node}/stats/get"), QoS::AtLeastOnce, false, "now")
        .await
        .unwrap();
    next(&mut rx, 30, |m| m.body["node"] == node).await.body
}

/// A daemon connected to `broker`, returned once it is online (and so subscribed).
async fn node(broker: &Broker, name: &str, credits: i64) -> Daemon {
    let (_c, mut rx) = watch(
        broker,
        &format!("wait-{name}"),
        &[&format!("removebg/{name}/available")],
    )
    .await;
    let d = Daemon::start(
        credits,
        &["--mqtt-url", &broker.url(), "--node-id", name, "--mqtt-account", "shop"],
    )
    .await;
    next(&mut rx, 30, |m| m.body == "online").await;
    d
}

fn image_json() -> Value {
    json!({"image_base64": b64(&read(fixture("chelsea.jpg"))), "output_size": "preview"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_job_is_mirrored_as_processing_then_completed_with_the_same_result_url() {
    let broker = Broker::start();
    let (_c, mut rx) = watch(&broker, "w1", &["removebg/nodeA/#"]).await;
    let d = node(&broker, "nodeA", 5).await;
    next(&mut rx, 20, |m| {
        m.topic == "removebg/nodeA/available" && m.body == "online"
    })
    .await;
    let key = d.key("shop", ALL_SCOPES);
    let (s, _, v) = d.post_json("/v1/removebg/process", &key, &image_json()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["id"].as_str().unwrap();
    let topic = format!("removebg/nodeA/jobs/{id}");
    let first = next(&mut rx, 20, |m| m.topic == topic).await;
    assert_eq!(first.body["status"], "processing");
    let done = next(&mut rx, 20, |m| m.topic == topic).await;
    assert_eq!(done.body["status"], "completed", "{}", done.body);
    assert_eq!(done.body["result_url"], v["result_url"]);
    assert_eq!(
        (done.body["width"].as_u64(), done.body["source"].as_str()),
        (Some(451), Some("http"))
    );

    // Stats on request.
    let (c, mut stats) = watch(&broker, "w2", &["removebg/nodeA/stats"]).await;
    c.publish("removebg/nodeA/stats/get", QoS::AtLeastOnce, false, "")
        .await
        .unwrap();
    let s = next(&mut stats, 20, |_| true).await.body;
    assert_eq!(
        (s["processed"].as_u64(), s["model"].as_str(), s["precision"].as_str()),
        (Some(1), Some("u2netp"), Some("f32")),
        "{s}"
    );
    assert!(s["median_latency_ms"].as_u64().is_some() && s["uptime_s"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_job_is_answered_on_its_response_topic_and_charged_to_the_mqtt_account() {
    let broker = Broker::start();
    let d = node(&broker, "nodeB", 1).await;
    let (rig, mut answers) = watch(&broker, "rig", &["rig/answers", "removebg/results/#"]).await;
    let props = |corr: &'static [u8]| PublishProperties {
        response_topic: Some("rig/answers".into()),
        correlation_data: Some(Bytes::from_static(corr)),
        ..Default::default()
    };
    let mut job = image_json();
    job["ref"] = json!("shot-1");
    rig.publish_with_properties(
        "removebg/jobs/submit",
        QoS::AtLeastOnce,
        false,
        job.to_string(),
        props(b"c-1"),
    )
    .await
    .unwrap();
    let m = next(&mut answers, 30, |m| m.topic == "rig/answers").await;
    assert_eq!(m.correlation.as_deref(), Some(&b"c-1"[..]));
    assert_eq!(
        (m.body["status"].as_str(), m.body["ref"].as_str()),
        (Some("completed"), Some("shot-1")),
        "{}",
        m.body
    );
    let r = d
        .client
        .get(m.body["result_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(d.credits("shop"), (1, 0));

    // A bad payload gets a failed answer with the HTTP API's code, and costs nothing.
    rig.publish_with_properties(
        "removebg/jobs/submit",
        QoS::AtLeastOnce,
        false,
        "not json",
        props(b"c-2"),
    )
    .await
    .unwrap();
    let m = next(&mut answers, 20, |m| m.topic == "rig/answers").await;
    assert_eq!(m.correlation.as_deref(), Some(&b"c-2"[..]));
    assert_eq!(
        (m.body["status"].as_str(), m.body["error"]["code"].as_str()),
        (Some("failed"), Some("malformed_json"))
    );
    let bad_format = json!({"image_url": "http://10.0.0.1/a.jpg", "output_format": "gif", "ref": "shot-2"});
    rig.publish("removebg/jobs/submit", QoS::AtLeastOnce, false, bad_format.to_string())
        .await
        .unwrap();
    let m = next(&mut answers, 20, |m| m.topic == "removebg/results/shot-2").await;
    assert_eq!(m.body["error"]["code"], "invalid_output_format");
    // No credits left: refused as over HTTP (402's code).
    let mut job = image_json();
    job["ref"] = json!("shot-3");
    rig.publish("removebg/jobs/submit", QoS::AtLeastOnce, false, job.to_string())
        .await
        .unwrap();
    let m = next(&mut answers, 20, |m| m.topic == "removebg/results/shot-3").await;
    assert_eq!(m.body["error"]["code"], "insufficient_credits");
    assert_eq!(d.credits("shop"), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_twenty_submitted_jobs_and_each_is_answered_once() {
    let broker = Broker::start();
    let (_w, mut seen) = watch(&broker, "w3", &["removebg/results/#", "removebg/+/jobs/+"]).await;
    let a = node(&broker, "nodeC", 50).await;
    let b = node(&broker, "nodeD", 50).await;
    // Both nodes must be subscribed before submitting, or the first takes everything.
    let (_x, mut avail) = watch(&broker, "w4", &["removebg/+/available"]).await;
    next(&mut avail, 20, |m| {
        m.topic == "removebg/nodeC/available" && m.body == "online"
    })
    .await;
    next(&mut avail, 20, |m| {
        m.topic == "removebg/nodeD/available" && m.body == "online"
    })
    .await;
    let (rig, _) = watch(&broker, "rig2", &["unused/topic"]).await;
    for i in 0..20 {
        let mut job = image_json();
        job["ref"] = json!(format!("job-{i}"));
        rig.publish("removebg/jobs/submit", QoS::AtLeastOnce, false, job.to_string())
            .await
            .unwrap();
    }
    let mut results = std::collections::HashMap::new();
    let mut by_node = std::collections::HashMap::<String, usize>::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while results.len() < 20 || by_node.values().sum::<usize>() < 20 {
        assert!(Instant::now() < deadline, "only {} results: {results:?}", results.len());
        let m = next(&mut seen, 120, |_| true).await;
        if let Some(r) = m.topic.strip_prefix("removebg/results/") {
            assert_eq!(m.body["status"], "completed", "{}", m.body);
            assert!(results.insert(r.to_owned(), m.body).is_none(), "{r} answered twice");
        } else if m.body["status"] == "completed" {
            *by_node
                .entry(m.topic.split('/').nth(1).unwrap().to_owned())
                .or_default() += 1;
        }
    }
    // Nothing more arrives for these jobs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(m) = seen.try_recv() {
        assert!(!m.topic.starts_with("removebg/results/"), "extra answer {m:?}");
    }
    assert!(by_node["nodeC"] > 0 && by_node["nodeD"] > 0, "{by_node:?}");
    let (used_a, _) = a.credits("shop");
    let (used_b, _) = b.credits("shop");
    assert_eq!(
        (used_a + used_b, used_a as usize, used_b as usize),
        (20, by_node["nodeC"], by_node["nodeD"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_keeps_working_while_the_broker_is_down_and_queued_events_arrive_after() {
    let mut broker = Broker::start();
    let d = node(&broker, "nodeE", 5).await;
    let key = d.key("shop", ALL_SCOPES);
    {
        let (_w, mut rx) = watch(&broker, "w5", &["removebg/nodeE/available"]).await;
        next(&mut rx, 20, |m| m.body == "online").await;
    }
    assert_eq!(mqtt_connected(&d).await, "1", "/metrics shows the link up");
    broker.stop();
    wait_link_down(&d).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (s, _, v) = d.post_json("/v1/removebg/process", &key, &image_json()).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    broker.launch();
    let (_w, mut rx) = watch(&broker, "w6", &["removebg/nodeE/#"]).await;
    next(&mut rx, 60, |m| {
        m.topic == "removebg/nodeE/available" && m.body == "online"
    })
    .await;
    for id in &ids {
        let topic = format!("removebg/nodeE/jobs/{id}");
        let m = next(&mut rx, 30, |m| m.topic == topic && m.body["status"] == "completed").await;
        assert!(m.body["result_url"].as_str().unwrap().ends_with(".png"));
    }
}

/// Returns once the node's /metrics shows the broker link down.
async fn wait_link_down(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while mqtt_connected(d).await != "0" {
        assert!(Instant::now() < deadline, "/metrics never showed the link down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `removebgd_mqtt_connected` sample of the node's /metrics.
async fn mqtt_connected(d: &Daemon) -> String {
    let text = d.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix("removebgd_mqtt_connected "))
        .expect("the metric is there when MQTT is configured")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_goes_offline_through_its_last_will() {
    let broker = Broker::start();
    let (_w, mut rx) = watch(&broker, "w7", &["removebg/nodeF/available"]).await;
    let mut d = node(&broker, "nodeF", 1).await;
    next(&mut rx, 20, |m| m.body == "online").await;
    d.kill();
    let m = next(&mut rx, 30, |m| m.body == "offline").await;
    assert_eq!(m.topic, "removebg/nodeF/available");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmitted_ref_is_not_run_again_but_answered_again_and_oversize_is_refused() {
    let broker = Broker::start();
    let d = node(&broker, "nodeG", 5).await;
    let (rig, mut answers) = watch(&broker, "rig3", &["removebg/results/#"]).await;
    let mut job = image_json();
    job["ref"] = json!("same");
    rig.publish("removebg/jobs/submit", QoS::AtLeastOnce, false, job.to_string())
        .await
        .unwrap();
    let first = next(&mut answers, 30, |m| m.topic == "removebg/results/same").await;
    assert_eq!(first.body["status"], "completed", "{}", first.body);
    rig.publish("removebg/jobs/submit", QoS::AtLeastOnce, false, job.to_string())
        .await
        .unwrap();
    let again = next(&mut answers, 30, |m| m.topic == "removebg/results/same").await;
    assert_eq!(
        (&again.body["id"], &again.body["result_url"]),
        (&first.body["id"], &first.body["result_url"])
    );
    assert_eq!(d.credits("shop"), (1, 0), "run and charged once");

    // 14 MB of base64: over the 10 MB image limit, answered without being decoded.
    let huge = json!({"image_base64": "A".repeat(14 * 1024 * 1024), "ref": "huge"});
    rig.publish("removebg/jobs/submit", QoS::AtLeastOnce, false, huge.to_string())
        .await
        .unwrap();
    let m = next(&mut answers, 30, |m| m.topic == "removebg/results/huge").await;
    assert_eq!(m.body["error"]["code"], "payload_too_large", "{}", m.body);
    assert_eq!(d.credits("shop"), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_jobs_survive_a_sigkill_and_run_once_after_restart() {
    let broker = Broker::start();
    let mut d = node(&broker, "nodeH", 20).await;
    let (rig, mut answers) = watch(&broker, "rig4", &["removebg/results/#"]).await;
    let refs: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    let submit = |r: &str| {
        let mut job = image_json();
        job["ref"] = json!(r);
        job.to_string()
    };
    for r in &refs {
        rig.publish("removebg/jobs/submit", QoS::AtLeastOnce, false, submit(r))
            .await
            .unwrap();
    }
    let first = next(&mut answers, 60, |m| m.topic.starts_with("removebg/results/")).await;
    d.kill();
    let mut answered: std::collections::HashSet<String> = [first.topic.rsplit('/').next().unwrap().to_owned()].into();
    let (used, reserved) = d.credits("shop");
    assert!(
        used + reserved == 6 && used < 6,
        "all six recorded before the kill: {used} used, {reserved} reserved"
    );

    d.launch().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut asked_again = false;
    while answered.len() < refs.len() {
        assert!(Instant::now() < deadline, "answered only {answered:?}");
        match tokio::time::timeout(Duration::from_secs(20), answers.recv()).await {
            Ok(Some(m)) => {
                assert_eq!(m.body["status"], "completed", "{}", m.body);
                answered.insert(m.topic.rsplit('/').next().unwrap().to_owned());
            }
            Ok(None) => panic!("watcher stopped"),
            // An answer published just before the kill may be lost; asking again re-answers.
            Err(_) if !asked_again => {
                asked_again = true;
                for r in refs.iter().filter(|r| !answered.contains(*r)) {
                    rig.publish("removebg/jobs/submit", QoS::AtLeastOnce, false, submit(r))
                        .await
                        .unwrap();
                }
            }
            Err(_) => panic!("answered only {answered:?}"),
        }
    }
    assert_eq!(d.credits("shop"), (6, 0), "each job charged exactly once");
    assert_eq!(d.store().result_totals().unwrap().0, 6, "and run once");
    // The queued image is deleted just after its job is recorded as done (and answered).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !listing(&d.data().join("inbox")).is_empty() {
        assert!(Instant::now() < deadline, "queued images are cleaned up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_publishes_offline_and_exits_zero() {
    let broker = Broker::start();
    let (_w, mut rx) = watch(&broker, "w8", &["removebg/nodeI/available"]).await;
    let mut d = node(&broker, "nodeI", 1).await;
    next(&mut rx, 20, |m| m.body == "online").await;
    let mut child = d.child.take().unwrap();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let m = next(&mut rx, 30, |m| m.body == "offline").await;
    assert_eq!(m.topic, "removebg/nodeI/available");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_progress_is_published_after_each_item() {
    let broker = Broker::start();
    let images = image_server().await;
    let (_w, mut rx) = watch(&broker, "w9", &["removebg/nodeJ/#"]).await;
    let d = Daemon::start(
        5,
        &[
            "--mqtt-url",
            &broker.url(),
            "--node-id",
            "nodeJ",
            "--mqtt-account",
            "shop",
            "--fetch-allow",
            "127.0.0.0/8",
        ],
    )
    .await;
    next(&mut rx, 20, |m| {
        m.topic == "removebg/nodeJ/available" && m.body == "online"
    })
    .await;
    let key = d.key("shop", ALL_SCOPES);
    let body = json!({"images": [
        {"url": format!("http://{images}/img/chelsea.jpg"), "id": "p1"},
        {"url": format!("http://{images}/img/missing.jpg"), "id": "p2"}
    ]});
    let (s, _, v) = d.post_json("/v1/removebg/batch", &key, &body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let topic = format!("removebg/nodeJ/batch/{}", v["job_id"].as_str().unwrap());
    let mut seen = Vec::new();
    let mut items = Vec::new();
    while seen.len() < 2 {
        let m = next(&mut rx, 30, |m| m.topic == topic || m.topic.contains("/jobs/")).await;
        if m.topic == topic {
            seen.push(m.body);
        } else {
            items.push(m.body);
        }
    }
    assert_eq!(seen[0]["status"], "processing", "{seen:?}");
    assert_eq!(seen[0]["total"], 2);
    let last = &seen[1];
    assert_eq!(
        (
            last["status"].as_str(),
            last["completed"].as_i64(),
            last["failed"].as_i64()
        ),
        (Some("completed"), Some(1), Some(1))
    );
    // The items themselves are mirrored with their batch and ref.
    let item = items
        .iter()
        .find(|b| b["ref"] == "p2" && b["status"] == "failed")
        .unwrap_or_else(|| panic!("{items:?}"));
    assert_eq!(item["batch_id"], v["job_id"]);
    assert_eq!(item["error"]["code"], "fetch_status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_with_extensions_runs_them_from_the_queue() {
    let broker = Broker::start();
    let d = node(&broker, "nodeX", 2).await;
    let (rig, mut answers) = watch(&broker, "rig-x", &["removebg/results/#"]).await;
    let job = json!({"image_base64": b64(&read(fixture("chelsea.jpg"))), "output_format": "jpg",
                     "crop": true, "crop_margin": "8px", "bg_color": "white", "ref": "ext-1"});
    rig.publish("removebg/jobs/submit", QoS::AtLeastOnce, false, job.to_string())
        .await
        .unwrap();
    let m = next(&mut answers, 30, |m| m.topic == "removebg/results/ext-1").await;
    assert_eq!(m.body["status"], "completed", "{}", m.body);
    let url = m.body["result_url"].as_str().unwrap();
    assert!(url.ends_with(".jpg"), "{url}");
    let (fw, fh) = (m.body["foreground_width"].as_u64().unwrap(), m.body["foreground_height"].as_u64().unwrap());
    assert_eq!((m.body["foreground_left"].as_u64(), m.body["foreground_top"].as_u64()), (Some(8), Some(8)));
    assert_eq!((m.body["width"].as_u64(), m.body["height"].as_u64()), (Some(fw + 16), Some(fh + 16)));
    let r = d.client.get(url).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    let img = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
    assert_eq!((img.width() as u64, img.height() as u64), (fw + 16, fh + 16));
    // The margin is white: the corner pixel of an opaque JPEG on white.
    let p = img.into_rgb8().get_pixel(0, 0).0;
    assert!(p.iter().all(|&c| c > 240), "{p:?}");
    assert_eq!(d.credits("shop"), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopped_and_restarted_every_2s_for_60s_costs_http_nothing_and_loses_no_job_event() {
    // The broker keeps sessions and queued messages across its restarts (persistence on, and a
    // graceful stop writes them), so every event the node hands it reaches the watcher: what is
    // checked is the node's side, that none is dropped on the way.
    let mut broker = Broker::persistent();
    let d = node(&broker, "nodeF", 100_000).await;
    let key = d.key("shop", ALL_SCOPES);
    let mut rx = persistent_watch(&broker, "flap-watcher", "removebg/nodeF/jobs/#").await;

    // 30 flaps, one every 2 s (60 s on an idle machine): the broker is stopped and started
    // again while a client keeps sending photos over HTTP. (Counted, not timed: on a loaded
    // machine each restart takes longer.)
    let mut ids = Vec::new();
    let mut flaps = 0;
    let mut next_flap = Instant::now() + Duration::from_secs(2);
    while flaps < 30 {
        if Instant::now() >= next_flap {
            broker.terminate();
            broker.launch();
            flaps += 1;
            next_flap = Instant::now() + Duration::from_secs(2);
        }
        let (s, _, v) = d.post_json("/v1/removebg/process", &key, &image_json()).await;
        assert_eq!(s, StatusCode::OK, "HTTP is unaffected: {v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    // Then the broker stays up: every job's completed event arrives (the node reconnects within
    // its 30 s backoff cap and sends what it queued).
    let mut missing: std::collections::BTreeSet<String> = ids.iter().cloned().collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !missing.is_empty() {
        let (topic, body) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {} completed events never arrived", missing.len(), ids.len()))
            .unwrap();
        if body["status"] == "completed" {
            missing.remove(topic.rsplit('/').next().unwrap());
        }
    }
    let stats = stats_of(&broker, "nodeF").await;
    assert_eq!(stats["dropped_events"], 0, "{stats}");
    eprintln!("broker flapped {flaps} times; {} HTTP jobs, all answered 200; every completed event arrived", ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_submissions_are_answered_and_counted_and_a_ref_less_repeat_runs_once() {
    let broker = Broker::start();
    let d = node(&broker, "nodeK", 5).await;
    let (rig, mut answers) = watch(&broker, "rig-k", &["rig/k/#"]).await;
    let send = |payload: String, corr: &'static str| {
        let rig = rig.clone();
        async move {
            let props = PublishProperties {
                response_topic: Some(format!("rig/k/{corr}")),
                correlation_data: Some(Bytes::from_static(corr.as_bytes())),
                ..Default::default()
            };
            rig.publish_with_properties("removebg/jobs/submit", QoS::AtLeastOnce, false, payload, props)
                .await
                .unwrap();
        }
    };
    // Refusals: each answered on its response topic with the HTTP API's code, none charged.
    let with_ref = |r: &str| {
        let mut job = image_json();
        job["ref"] = json!(r);
        job.to_string()
    };
    let refused = [
        ("not json".to_owned(), "b1", "malformed_json"),
        (json!({"image_url": "http://10.0.0.1/a.jpg", "nope": 1}).to_string(), "b2", "invalid_request"),
        (with_ref("a/b"), "b3", "invalid_request"),
        (with_ref("bell\u{7}"), "b4", "invalid_request"),
        (with_ref(&"r".repeat(201)), "b5", "invalid_request"),
        (with_ref("wild+card"), "b6", "invalid_request"),
    ];
    for (payload, corr, code) in &refused {
        send(payload.clone(), corr).await;
        let topic = format!("rig/k/{corr}");
        let m = next(&mut answers, 30, |m| m.topic == topic).await;
        assert_eq!(
            (m.body["status"].as_str(), m.body["error"]["code"].as_str()),
            (Some("failed"), Some(*code)),
            "{corr}: {}",
            m.body
        );
        assert_eq!(m.correlation.as_deref(), Some(corr.as_bytes()));
    }
    // The longest ref allowed is fine.
    send(with_ref(&"r".repeat(200)), "ok200").await;
    let m = next(&mut answers, 60, |m| m.topic == "rig/k/ok200").await;
    assert_eq!((m.body["status"].as_str(), m.body["ref"].as_str().map(str::len)), (Some("completed"), Some(200)));

    // Without a ref, the same payload, response topic and correlation data is the same
    // submission: not run again, answered again with the same job.
    let plain = image_json().to_string();
    send(plain.clone(), "same").await;
    let first = next(&mut answers, 60, |m| m.topic == "rig/k/same").await;
    assert_eq!(first.body["status"], "completed", "{}", first.body);
    send(plain.clone(), "same").await;
    let again = next(&mut answers, 60, |m| m.topic == "rig/k/same").await;
    assert_eq!(
        (&again.body["id"], &again.body["result_url"]),
        (&first.body["id"], &first.body["result_url"])
    );
    // Different correlation data makes it a different submission.
    send(plain, "other").await;
    let other = next(&mut answers, 60, |m| m.topic == "rig/k/other").await;
    assert_eq!(other.body["status"], "completed", "{}", other.body);
    assert_ne!(other.body["id"], first.body["id"]);

    assert_eq!(d.credits("shop"), (3, 0), "the 200-character ref, the first plain one and the other");
    let stats = stats_of(&broker, "nodeK").await;
    assert_eq!(stats["bad_submissions"], refused.len(), "{stats}");
    assert_eq!(stats["dropped_events"], 0, "{stats}");
}

/// The messages that arrive on `rx`: the first within `first` seconds, then until `quiet`
/// seconds pass without one.
async fn drain(rx: &mut mpsc::UnboundedReceiver<(String, Value)>, first: u64, quiet: u64) -> Vec<(String, Value)> {
    let mut got = Vec::new();
    let mut wait = Duration::from_secs(first);
    while let Ok(m) = tokio::time::timeout(wait, rx.recv()).await {
        got.push(m.expect("the watcher stopped"));
        wait = Duration::from_secs(quiet);
    }
    assert!(!got.is_empty(), "nothing arrived within {first} s");
    got
}

/// Job and batch messages only (not availability or stats).
fn job_messages(all: &[(String, Value)]) -> Vec<(String, Value)> {
    all.iter()
        .filter(|(t, _)| t.contains("/jobs/") || t.contains("/batch/"))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_broker_is_away_the_newest_1000_messages_wait_and_older_ones_are_counted_as_dropped() {
    let mut broker = Broker::persistent();
    let d = node(&broker, "nodeL", 500).await;
    let key = d.key("shop", ALL_SCOPES);
    let mut rx = persistent_watch(&broker, "drop-watcher", "removebg/nodeL/#").await;
    // Every message one batch of 100 failing items produces, counted with the broker up.
    let batch = |tag: &str| {
        let images: Vec<Value> = (0..100)
            .map(|i| json!({"url": format!("http://127.0.0.1:9/{tag}-{i}.jpg"), "id": format!("{tag}-{i}")}))
            .collect();
        json!({"images": images})
    };
    let run = |body: Value| {
        let d = &d;
        let key = key.clone();
        async move {
            let (s, _, v) = d.post_json("/v1/removebg/batch", &key, &body).await;
            assert_eq!(s, StatusCode::ACCEPTED, "{v}");
            v["job_id"].as_str().unwrap().to_owned()
        }
    };
    let wait_batch = |id: String| {
        let d = &d;
        let key = key.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let (s, h, v) = d.get(&format!("/v1/removebg/batch/{id}"), &key).await;
                if s == StatusCode::OK && v["status"] != "processing" {
                    assert_eq!(v["failed"], 100, "{v}");
                    return;
                }
                assert!(Instant::now() < deadline, "the batch never finished: {v}");
                let wait = h.get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(2);
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
        }
    };
    let id = run(batch("up")).await;
    wait_batch(id.clone()).await;
    let per_batch = job_messages(&drain(&mut rx, 30, 3).await).len();
    assert!(per_batch >= 200, "{per_batch} messages for 100 items");

    // The broker goes away; four such batches make more than the queue's 1000 messages.
    broker.terminate();
    wait_link_down(&d).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(run(batch(&format!("down{i}"))).await);
    }
    for id in &ids {
        wait_batch(id.clone()).await;
    }
    let produced = 4 * per_batch;
    broker.launch();
    // What arrives: the newest messages, the last batch's final progress among them.
    // The node reconnects within its backoff (at most 30 s), then sends what it kept.
    let delivered = job_messages(&drain(&mut rx, 90, 5).await);
    let received = delivered.len();
    let mut per_id = std::collections::HashMap::<String, usize>::new();
    for (_, body) in &delivered {
        let batch = body["batch_id"].as_str().or(body["job_id"].as_str()).unwrap_or_default();
        *per_id.entry(batch.to_owned()).or_default() += 1;
    }
    let stats = stats_of(&broker, "nodeL").await;
    let dropped = stats["dropped_events"].as_u64().unwrap() as usize;
    eprintln!("{per_batch} messages per batch; {produced} produced while away, {received} delivered, {dropped} dropped; per batch {per_id:?}");
    assert!(dropped > 0, "{stats}");
    assert!(received <= 1000, "{received} delivered from a queue of 1000");
    // Every message is either delivered or counted; the queue may also have held a stats
    // message or two (every 30 s), which take a place and may be dropped instead.
    assert!(
        (produced..=produced + 2).contains(&(received + dropped)),
        "{received} delivered + {dropped} dropped != {produced} produced"
    );
    // The oldest are the ones dropped: the last batch arrives whole, the first does not.
    assert_eq!(per_id.get(&ids[3]).copied(), Some(per_batch), "{per_id:?}");
    assert!(per_id.get(&ids[0]).copied().unwrap_or(0) < per_batch, "{per_id:?}");
}
