//! Prometheus metrics, served by the admin API at `/metrics` in the
//! Prometheus text format (version 0.0.4).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label set of a metric family: label names and values.
type Labels = Vec<(&'static str, &'static str)>;

/// Upper bounds of the scan duration buckets, in seconds: from 5 ms (the
/// built-in rules on a small message) to 30 s (clamd on a large archive).
const SCAN_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric sendguard exports, registered once at start.
pub struct Metrics {
    registry: Registry,
    messages: Family<Labels, Counter>,
    strikes: Counter,
    lockouts: Family<Labels, Counter>,
    refusals: Counter,
    deliveries: Family<Labels, Counter>,
    scan_duration: Histogram,
    /// Set from the store just before each scrape.
    pub active_blocks: Family<Labels, Gauge>,
    /// Set from the store just before each scrape.
    pub outbox_waiting: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sendguard");
        let messages = Family::<Labels, Counter>::default();
        registry.register(
            "messages",
            "Messages scanned, by verdict (clean, virus, spam, unscannable, scan_failed)",
            messages.clone(),
        );
        let strikes = Counter::default();
        registry.register(
            "strikes",
            "Bad messages counted against a mailbox",
            strikes.clone(),
        );
        let lockouts = Family::<Labels, Counter>::default();
        registry.register(
            "lockouts",
            "Lockouts started, by kind (timed, permanent) and mode (enforce, monitor)",
            lockouts.clone(),
        );
        let refusals = Counter::default();
        registry.register(
            "sender_refusals",
            "MAIL FROM commands refused because the mailbox is locked out",
            refusals.clone(),
        );
        let deliveries = Family::<Labels, Counter>::default();
        registry.register(
            "action_attempts",
            "Webhook and alert e-mail delivery attempts, by action and outcome (delivered, failed, abandoned)",
            deliveries.clone(),
        );
        let scan_duration = Histogram::new(SCAN_BUCKETS);
        registry.register(
            "scan_duration_seconds",
            "Time to scan one message with every scanner",
            scan_duration.clone(),
        );
        let active_blocks = Family::<Labels, Gauge>::default();
        registry.register(
            "active_blocks",
            "Mailboxes locked out now, by kind (timed, permanent)",
            active_blocks.clone(),
        );
        let outbox_waiting = Gauge::default();
        registry.register(
            "outbox_waiting",
            "Webhooks and alert e-mails waiting for delivery",
            outbox_waiting.clone(),
        );
        // Every label combination exists from the start, so a scrape after
        // a restart shows zeros instead of missing series.
        for verdict in ["clean", "virus", "spam", "unscannable", "scan_failed"] {
            let _ = messages.get_or_create(&vec![("verdict", verdict)]);
        }
        for kind in ["timed", "permanent"] {
            for mode in ["enforce", "monitor"] {
                let _ = lockouts.get_or_create(&vec![("kind", kind), ("mode", mode)]);
            }
            let _ = active_blocks.get_or_create(&vec![("kind", kind)]);
        }
        for action in ["endpoint_scan", "admin_alert", "alert_mail"] {
            for outcome in ["delivered", "failed", "abandoned"] {
                let _ = deliveries.get_or_create(&vec![("action", action), ("outcome", outcome)]);
            }
        }
        Metrics {
            registry,
            messages,
            strikes,
            lockouts,
            refusals,
            deliveries,
            scan_duration,
            active_blocks,
            outbox_waiting,
        }
    }

    /// Counts a scanned message; `verdict` is a verdict kind or
    /// `scan_failed`.
    pub fn message_scanned(&self, verdict: &'static str, seconds: f64) {
        self.messages
            .get_or_create(&vec![("verdict", verdict)])
            .inc();
        self.scan_duration.observe(seconds);
    }

    pub fn strike_counted(&self) {
        self.strikes.inc();
    }

    pub fn lockout_started(&self, permanent: bool, enforced: bool) {
        let kind = if permanent { "permanent" } else { "timed" };
        let mode = if enforced { "enforce" } else { "monitor" };
        self.lockouts
            .get_or_create(&vec![("kind", kind), ("mode", mode)])
            .inc();
    }

    pub fn sender_refused(&self) {
        self.refusals.inc();
    }

    pub fn delivery_attempt(&self, action: &'static str, outcome: &'static str) {
        self.deliveries
            .get_or_create(&vec![("action", action), ("outcome", outcome)])
            .inc();
    }

    /// Registers the store's count of decisions made with the host's own
    /// SQLite store while Redis failed (`on_store_error = "local"`).
    pub fn register_store_local_decisions(&mut self, counter: Counter) {
        self.registry.register(
            "store_local_decisions",
            "Sender checks and strikes decided with this host's SQLite store because Redis failed",
            counter,
        );
    }

    /// Returns every metric in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_appear_with_labels() {
        let metrics = Metrics::new();
        metrics.message_scanned("spam", 0.02);
        metrics.message_scanned("spam", 0.03);
        metrics.lockout_started(false, true);
        let text = metrics.encode();
        assert!(
            text.contains("sendguard_messages_total{verdict=\"spam\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("sendguard_lockouts_total{kind=\"timed\",mode=\"enforce\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("sendguard_scan_duration_seconds_count 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE sendguard_strikes_total counter\n"),
            "{text}"
        );
    }
}
