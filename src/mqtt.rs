//! The MQTT side (see README "MQTT API"): mirrors every job's progress, takes jobs from capture
//! rigs on a shared subscription, reports availability and statistics. One task owns rumqttc's
//! event loop and only polls it; another owns the topics. Nothing here can slow the HTTP API:
//! while the broker is away, outgoing messages wait in a bounded queue (oldest dropped, counted).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::clock::rfc3339;
use crate::config::MqttSettings;
use crate::jobs::request::parse_json;
use crate::jobs::{JobError, JobEvent, JobMeta, Jobs, Options, Source, new_id};
use crate::store::{Enqueued, Outcome, Reply};

/// Largest packet accepted from the broker: a 10 MiB image as base64 plus JSON, with room to
/// read (and refuse with an answer) a somewhat larger one.
const MAX_INCOMING_PACKET: u32 = 24 * 1024 * 1024;
/// Messages kept while the broker is unreachable.
const OUTBOX_LIMIT: usize = 1000;
const STATS_EVERY: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the MQTT side needs from the rest of the daemon.
pub struct MqttContext {
    pub jobs: Jobs,
    /// Account id MQTT submissions are charged to.
    pub account_id: i64,
    /// Base of result URLs for jobs that did not come over HTTP.
    pub base_url: String,
    pub model: String,
    /// The precision the model runs in (`f32`, `int8`, ...).
    pub precision: String,
    /// Connection state, for /metrics.
    pub link: Arc<crate::metrics::LinkState>,
}

struct Outgoing {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    properties: Option<PublishProperties>,
}

/// Counters the stats topic reports.
#[derive(Default)]
struct Counters {
    dropped_events: AtomicU64,
    bad_submissions: AtomicU64,
}

struct Topics {
    prefix: String,
    node: String,
}

impl Topics {
    fn available(&self) -> String {
        format!("{}/{}/available", self.prefix, self.node)
    }
    fn job(&self, id: &str) -> String {
        format!("{}/{}/jobs/{id}", self.prefix, self.node)
    }
    fn batch(&self, id: &str) -> String {
        format!("{}/{}/batch/{id}", self.prefix, self.node)
    }
    fn stats(&self) -> String {
        format!("{}/{}/stats", self.prefix, self.node)
    }
    fn stats_request(&self) -> String {
        format!("{}/{}/stats/get", self.prefix, self.node)
    }
    fn submit(&self) -> String {
        format!("{}/jobs/submit", self.prefix)
    }
    fn shared_submit(&self) -> String {
        format!("$share/{}-workers/{}/jobs/submit", self.prefix, self.prefix)
    }
    fn result(&self, key: &str) -> String {
        format!("{}/results/{key}", self.prefix)
    }
}

/// What the poller tells the topic task.
enum Net {
    Connected,
    Disconnected(String),
    Message(Publish),
}

/// Connects and runs until `stop` is cancelled; then publishes `offline` and disconnects.
pub fn start(settings: &MqttSettings, ctx: MqttContext, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    ctx.link.set_connected(false);
    let topics = Arc::new(Topics {
        prefix: settings.prefix.clone(),
        node: settings.node_id.clone(),
    });
    let mut opts = MqttOptions::new(format!("removebgd-{}", settings.node_id), &settings.host, settings.port);
    opts.set_keep_alive(Duration::from_secs(15));
    // A persistent session: the broker keeps our unacknowledged jobs and we resend our
    // unacknowledged messages after a reconnect.
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(24 * 3600));
    opts.set_manual_acks(true);
    opts.set_max_packet_size(Some(MAX_INCOMING_PACKET));
    opts.set_last_will(LastWill::new(
        topics.available(),
        "offline",
        QoS::AtLeastOnce,
        true,
        None,
    ));
    if let (Some(u), p) = (&settings.username, &settings.password) {
        opts.set_credentials(u.clone(), p.clone().unwrap_or_default());
    }
    if settings.tls {
        let _ = rustls::crypto::ring::default_provider().install_default();
        opts.set_transport(rumqttc::Transport::tls_with_default_config());
    }
    let (client, eventloop) = AsyncClient::new(opts, 64);
    let (net_tx, net_rx) = mpsc::channel(16);
    let poller = tokio::spawn(poll(eventloop, net_tx, stop.clone()));
    let events = ctx.jobs.subscribe();
    tokio::spawn(async move {
        let node = Node {
            client,
            topics,
            ctx: Arc::new(ctx),
            outbox: VecDeque::new(),
            connected: false,
            counters: Arc::new(Counters::default()),
        };
        node.run(net_rx, events, stop).await;
        poller.abort();
    })
}

/// Keeps polling the event loop; reconnects with capped exponential backoff.
async fn poll(mut eventloop: EventLoop, tx: mpsc::Sender<Net>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = stop.cancelled() => {
                // Let the topic task's last messages (offline, disconnect) go out.
                let deadline = tokio::time::sleep(Duration::from_secs(2));
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        e = eventloop.poll() => if e.is_err() { return },
                        _ = &mut deadline => return,
                    }
                }
            }
        };
        let msg = match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(250);
                Net::Connected
            }
            Ok(Event::Incoming(Packet::Publish(p))) => Net::Message(p),
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(Net::Disconnected(e.to_string())).await;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if tx.send(msg).await.is_err() {
            return;
        }
    }
}

struct Node {
    client: AsyncClient,
    topics: Arc<Topics>,
    ctx: Arc<MqttContext>,
    outbox: VecDeque<Outgoing>,
    connected: bool,
    counters: Arc<Counters>,
}

impl Node {
    async fn run(
        mut self,
        mut net: mpsc::Receiver<Net>,
        mut events: broadcast::Receiver<JobEvent>,
        stop: CancellationToken,
    ) {
        let mut stats = tokio::time::interval(STATS_EVERY);
        let mut retry = tokio::time::interval(Duration::from_millis(200));
        let (answers_tx, mut answers) = mpsc::channel::<Outgoing>(64);
        loop {
            tokio::select! {
                msg = net.recv() => match msg {
                    Some(Net::Connected) => self.connected().await,
                    Some(Net::Disconnected(why)) => {
                        if self.connected {
                            tracing::warn!(error = %why, "MQTT broker connection lost; queueing messages");
                        } else {
                            tracing::debug!(error = %why, "MQTT broker unreachable");
                        }
                        self.connected = false;
                        self.ctx.link.set_connected(false);
                    }
                    Some(Net::Message(p)) => self.incoming(p, &answers_tx),
                    None => return,
                },
                event = events.recv() => match event {
                    Ok(e) => self.mirror(e),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        self.counters.dropped_events.fetch_add(n, Ordering::Relaxed);
                        tracing::warn!(dropped = n, "MQTT mirror fell behind; events dropped");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                Some(answer) = answers.recv() => self.queue(answer),
                _ = stats.tick() => {
                    let s = stats_message(&self.ctx, &self.counters, &self.topics).await;
                    self.queue(s);
                }
                _ = retry.tick(), if self.connected && !self.outbox.is_empty() => {}
                _ = stop.cancelled() => {
                    self.shut_down().await;
                    return;
                }
            }
            self.flush();
        }
    }

    async fn connected(&mut self) {
        tracing::info!(node = %self.topics.node, "MQTT connected");
        self.connected = true;
        self.ctx.link.set_connected(true);
        // Subscriptions are renewed on every connection, as the session may be new.
        let subs = [
            (self.topics.shared_submit(), QoS::AtLeastOnce),
            (self.topics.stats_request(), QoS::AtMostOnce),
        ];
        for (topic, qos) in subs {
            if let Err(e) = self.client.try_subscribe(topic.clone(), qos) {
                tracing::error!(topic, error = %e, "MQTT subscribe failed");
            }
        }
        // Availability goes first, ahead of anything queued while we were away.
        self.outbox.push_front(Outgoing {
            topic: self.topics.available(),
            payload: b"online".to_vec(),
            retain: true,
            properties: None,
        });
    }

    async fn shut_down(&mut self) {
        self.outbox.clear();
        if self.connected {
            let available = self.topics.available();
            let _ = self.client.publish(available, QoS::AtLeastOnce, true, "offline").await;
            let _ = self.client.disconnect().await;
        }
        tracing::info!("MQTT offline published");
    }

    fn queue(&mut self, msg: Outgoing) {
        if self.outbox.len() >= OUTBOX_LIMIT {
            self.outbox.pop_front();
            self.counters.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
        self.outbox.push_back(msg);
    }

    /// Hands queued messages to rumqttc while connected; what it can't take now waits.
    fn flush(&mut self) {
        while self.connected
            && let Some(m) = self.outbox.front()
        {
            let sent = match &m.properties {
                Some(p) => self.client.try_publish_with_properties(
                    m.topic.clone(),
                    QoS::AtLeastOnce,
                    m.retain,
                    m.payload.clone(),
                    p.clone(),
                ),
                None => self
                    .client
                    .try_publish(m.topic.clone(), QoS::AtLeastOnce, m.retain, m.payload.clone()),
            };
            if sent.is_err() {
                break;
            }
            self.outbox.pop_front();
        }
    }

    /// Mirrors a job event, and answers MQTT submitters.
    fn mirror(&mut self, event: JobEvent) {
        match event {
            JobEvent::Processing(job) => {
                let body = with_job(&job, json!({"status": "processing"}));
                self.queue(plain(self.topics.job(&job.id), body));
            }
            JobEvent::Completed {
                job,
                file,
                width,
                height,
                expires_at,
                foreground,
            } => {
                let base = job.base_url.as_deref().unwrap_or(&self.ctx.base_url);
                let body = with_job(&job, completed(base, &file, width, height, expires_at, foreground));
                self.queue(plain(self.topics.job(&job.id), body.clone()));
                if job.source == "mqtt" {
                    let answer = answer(&self.topics, &job.id, job.client_ref.as_deref(), &job.reply, body);
                    self.queue(answer);
                }
            }
            JobEvent::Failed { job, code, message } => {
                let body = with_job(&job, failure(code, &message));
                self.queue(plain(self.topics.job(&job.id), body.clone()));
                if job.source == "mqtt" {
                    let answer = answer(&self.topics, &job.id, job.client_ref.as_deref(), &job.reply, body);
                    self.queue(answer);
                }
            }
            JobEvent::Batch {
                batch_id,
                total,
                completed,
                failed,
            } => {
                let status = match (completed + failed == total, completed > 0) {
                    (false, _) => "processing",
                    (true, true) => "completed",
                    (true, false) => "failed",
                };
                let body = json!({"job_id": batch_id, "status": status, "total": total,
                                  "completed": completed, "failed": failed});
                self.queue(plain(self.topics.batch(&batch_id), body));
            }
        }
    }

    /// A message on a subscribed topic.
    fn incoming(&mut self, p: Publish, answers: &mpsc::Sender<Outgoing>) {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        if topic == self.topics.stats_request() {
            let client = self.client.clone();
            tokio::spawn(async move {
                let _ = client.ack(&p).await;
            });
            // Answered on the next stats tick would be late; build it now.
            let ctx = Arc::clone(&self.ctx);
            let counters = Arc::clone(&self.counters);
            let topics = Arc::clone(&self.topics);
            let answers = answers.clone();
            tokio::spawn(async move {
                let _ = answers.send(stats_message(&ctx, &counters, &topics).await).await;
            });
            return;
        }
        if topic != self.topics.submit() {
            tracing::debug!(topic, "ignoring a message on an unexpected topic");
            let client = self.client.clone();
            tokio::spawn(async move {
                let _ = client.ack(&p).await;
            });
            return;
        }
        let (client, ctx, topics, counters, answers) = (
            self.client.clone(),
            Arc::clone(&self.ctx),
            Arc::clone(&self.topics),
            Arc::clone(&self.counters),
            answers.clone(),
        );
        tokio::spawn(async move {
            if let Some(answer) = submit(&p, &ctx, &topics, &counters).await {
                let _ = answers.send(answer).await;
            }
            // Acknowledged only now: the job is in the database (or was answered as refused).
            if let Err(e) = client.ack(&p).await {
                tracing::warn!(error = %e, "could not acknowledge a submission");
            }
        });
    }
}

async fn stats_message(ctx: &MqttContext, counters: &Counters, topics: &Topics) -> Outgoing {
    let jobs = &ctx.jobs;
    let queued_in_db = jobs.db(|s| s.queued_jobs()).await.unwrap_or(0);
    let s = jobs.stats();
    let body = json!({
        "node": topics.node,
        "model": ctx.model,
        "precision": ctx.precision,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": s.uptime().as_secs(),
        "queue_depth": jobs.pool().queued() as i64 + queued_in_db,
        "in_flight": jobs.pool().running(),
        "processed": s.processed.load(Ordering::Relaxed),
        "failed": s.failed.load(Ordering::Relaxed),
        "median_latency_ms": s.median_latency().map(|d| d.as_millis() as u64),
        "dropped_events": counters.dropped_events.load(Ordering::Relaxed),
        "bad_submissions": counters.bad_submissions.load(Ordering::Relaxed),
    });
    plain(topics.stats(), body)
}

/// A submission payload, validated: the submitter's `ref` (if any) and the job.
#[derive(Debug)]
pub struct Submission {
    pub client_ref: Option<String>,
    pub source: Source,
    pub opts: Options,
}

/// Parses and validates a submission payload (the JSON of `POST /process` plus `ref`), without
/// queueing it. A refusal carries the `ref` to answer under (none when the `ref` itself is bad).
pub fn parse_submission(payload: &[u8]) -> Result<Submission, (Option<String>, JobError)> {
    let request = parse_json(payload).map_err(|e| (None, e))?;
    let client_ref = request.client_ref.clone().filter(|r| !r.is_empty());
    // The ref names the answer's topic (`<prefix>/results/<ref>`): one topic level, and nothing
    // a broker refuses as malformed (MQTT 5.0, 1.5.4). Mosquitto disconnects a client that
    // publishes such a topic, and the session would publish it again after every reconnect.
    if let Some(r) = &client_ref
        && (r.len() > 200 || r.contains(['/', '+', '#']) || r.chars().any(not_in_topics))
    {
        let message = "ref must be at most 200 characters without /, +, # or control characters".to_owned();
        return Err((
            None,
            JobError::Invalid {
                code: "invalid_request",
                message,
            },
        ));
    }
    let (source, opts) = request.into_job(None).map_err(|e| (client_ref.clone(), e))?;
    Ok(Submission {
        client_ref,
        source,
        opts,
    })
}

/// Characters MQTT lets a broker refuse in a topic: control characters (U+0000 among them) and
/// the Unicode non-characters.
fn not_in_topics(c: char) -> bool {
    let u = u32::from(c);
    c.is_control() || (0xFDD0..=0xFDEF).contains(&u) || u & 0xFFFE == 0xFFFE
}

/// Validates and queues one submission. Returns the answer to publish when it is refused.
async fn submit(p: &Publish, ctx: &MqttContext, topics: &Topics, counters: &Counters) -> Option<Outgoing> {
    let reply = Reply {
        topic: p
            .properties
            .as_ref()
            .and_then(|pr| pr.response_topic.clone())
            .filter(|t| !t.is_empty() && !t.contains(['+', '#'])),
        correlation: p
            .properties
            .as_ref()
            .and_then(|pr| pr.correlation_data.as_ref())
            .map(|c| c.to_vec()),
    };
    let refuse = |id: &str, client_ref: Option<&str>, code: &'static str, message: String| {
        counters.bad_submissions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(code, error = %message, "MQTT submission refused");
        let body = json!({"id": id, "ref": client_ref, "source": "mqtt"});
        answer(topics, id, client_ref, &reply, merge(body, failure(code, &message)))
    };
    // Size is bounded by MAX_INCOMING_PACKET; an image over the limit is refused (with the
    // submitter's ref) by the same check as over HTTP, before it is decoded.
    let id = new_id("rbg");
    let Submission {
        client_ref,
        source,
        opts,
    } = match parse_submission(&p.payload) {
        Ok(s) => s,
        Err((client_ref, e)) => return Some(refuse(&id, client_ref.as_deref(), e.code(), e.to_string())),
    };
    let dedupe = match &client_ref {
        Some(r) => format!("ref:{r}"),
        None => {
            let mut h = Sha256::new();
            h.update(&p.payload);
            h.update(reply.topic.as_deref().unwrap_or("").as_bytes());
            h.update(reply.correlation.as_deref().unwrap_or(&[]));
            format!("sha256:{}", crate::digest::hex(&h.finalize()))
        }
    };
    match ctx
        .jobs
        .enqueue(ctx.account_id, source, opts, client_ref.clone(), dedupe, reply.clone())
        .await
    {
        Ok((id, Enqueued::Queued)) => {
            tracing::info!(job_id = %id, r#ref = client_ref.as_deref(), "MQTT job queued");
            None
        }
        Ok((_, Enqueued::Duplicate { id, status })) => {
            tracing::info!(job_id = %id, status = status.as_str(), "MQTT submission already seen; not run again");
            // A finished job is answered again (its first answer may have been lost); one still
            // queued or running will answer when it ends.
            let lookup = id.clone();
            let outcome = ctx.jobs.db(move |s| s.job_outcome(&lookup)).await.ok().flatten()?;
            let head = json!({"id": id, "ref": client_ref, "source": "mqtt"});
            let body = match outcome {
                Outcome::Completed {
                    file,
                    width,
                    height,
                    expires_at,
                } => completed(&ctx.base_url, &file, width, height, expires_at, None),
                Outcome::Failed { code, message } => failure(&code, &message),
            };
            Some(answer(topics, &id, client_ref.as_deref(), &reply, merge(head, body)))
        }
        Err(e @ JobError::Internal(_)) => {
            // Not recorded: leave it unacknowledged so the broker delivers it again.
            tracing::error!(error = %e, "could not record an MQTT job");
            None
        }
        Err(e) => Some(refuse(&id, client_ref.as_deref(), e.code(), e.to_string())),
    }
}

/// A completed job's message; the subject's box (an extension) when known.
fn completed(base_url: &str, file: &str, width: u32, height: u32, expires_at: i64, fg: Option<[u32; 4]>) -> Value {
    let mut body = json!({
        "status": "completed",
        "result_url": format!("{base_url}/v1/removebg/results/{file}"),
        "width": width,
        "height": height,
        "credits_used": 1,
        "expires_at": rfc3339(expires_at),
    });
    if let Some([left, top, w, h]) = fg {
        body["foreground_top"] = json!(top);
        body["foreground_left"] = json!(left);
        body["foreground_width"] = json!(w);
        body["foreground_height"] = json!(h);
    }
    body
}

fn failure(code: &str, message: &str) -> Value {
    json!({"status": "failed", "credits_used": 0, "error": {"code": code, "message": message}})
}

fn with_job(job: &JobMeta, body: Value) -> Value {
    let mut base = json!({"id": job.id, "source": job.source});
    if let Some(b) = &job.batch_id {
        base["batch_id"] = json!(b);
    }
    if let Some(r) = &job.client_ref {
        base["ref"] = json!(r);
    }
    merge(base, body)
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

fn plain(topic: String, body: Value) -> Outgoing {
    Outgoing {
        topic,
        payload: body.to_string().into_bytes(),
        retain: false,
        properties: None,
    }
}

/// The answer to a submission: to its response topic with its correlation data when it gave
/// one, else to `<prefix>/results/<ref or id>`.
fn answer(topics: &Topics, id: &str, client_ref: Option<&str>, reply: &Reply, body: Value) -> Outgoing {
    match &reply.topic {
        Some(t) => Outgoing {
            topic: t.clone(),
            payload: body.to_string().into_bytes(),
            retain: false,
            properties: Some(PublishProperties {
                correlation_data: reply.correlation.clone().map(Bytes::from),
                content_type: Some("application/json".into()),
                ..PublishProperties::default()
            }),
        },
        None => plain(topics.result(client_ref.unwrap_or(id)), body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_ref(payload: &[u8]) -> Option<String> {
        match parse_submission(payload) {
            Ok(s) => panic!("accepted, with ref {:?}", s.client_ref),
            Err((client_ref, e)) => {
                assert_eq!(e.code(), "invalid_request", "{e}");
                client_ref
            }
        }
    }

    /// fuzz/regressions/mqtt_submission/ref-control-character.json: a ref with U+001F was
    /// accepted, and its answer's topic made mosquitto drop the daemon's connection.
    #[test]
    fn a_ref_that_cannot_be_a_topic_level_is_refused() {
        let found = include_bytes!("../fuzz/regressions/mqtt_submission/ref-control-character.json");
        assert_eq!(refused_ref(found), None, "answered under the job id, not the bad ref");
        for r in [
            "a\\u0000b",
            "\\u0001",
            "a\\u007f",
            "\\u0085",
            "x\\ufffe",
            "\\ufdd0",
            "\\ud83f\\udfff",
            "a/b",
            "a+",
            "#",
        ] {
            let payload = format!(r#"{{"image_url": "http://192.168.1.20/a.jpg", "ref": "{r}"}}"#);
            assert_eq!(refused_ref(payload.as_bytes()), None, "{r}");
        }
        let ok = br#"{"image_url": "http://192.168.1.20/a.jpg", "ref": "shot-1 \u00e9\u2603"}"#;
        let s = parse_submission(ok).unwrap();
        assert_eq!(s.client_ref.as_deref(), Some("shot-1 \u{e9}\u{2603}"));
    }
}
