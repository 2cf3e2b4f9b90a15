//! Counters and histograms of the server, rendered in Prometheus' text format at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Bucket bounds of the latency histograms, in seconds.
const LATENCY_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Bucket bounds of the batch-size histogram, in sequences.
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A cumulative histogram, as Prometheus reports one.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        for (count, bound) in self.counts.iter_mut().zip(self.bounds) {
            if value <= *bound {
                *count += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (count, bound) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// The server's metrics; shared by the HTTP side and the scheduler.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    batch_sizes: Mutex<Histogram>,
    /// Tokens generated, all requests together.
    pub generated_tokens: AtomicU64,
    /// Prompt tokens processed.
    pub prompt_tokens: AtomicU64,
    /// Requests waiting for a batch slot.
    pub queue_depth: AtomicUsize,
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// Adapters loaded.
    pub adapters_loaded: AtomicUsize,
    /// Forward steps run.
    pub steps: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            latency: Mutex::default(),
            batch_sizes: Mutex::new(Histogram::new(BATCH_BOUNDS)),
            generated_tokens: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            queue_depth: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            adapters_loaded: AtomicUsize::new(0),
            steps: AtomicU64::new(0),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Metrics stay usable after a panic elsewhere: each update is a few additions.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// Count a finished request of `endpoint` with `status`, which took `seconds`.
    pub fn record_request(&self, endpoint: &'static str, status: u16, seconds: f64) {
        *lock(&self.requests).entry((endpoint, status)).or_default() += 1;
        lock(&self.latency)
            .entry(endpoint)
            .or_insert_with(|| Histogram::new(LATENCY_BOUNDS))
            .observe(seconds);
    }

    /// Count a forward step over `rows` sequences.
    pub fn record_batch(&self, rows: usize) {
        lock(&self.batch_sizes).observe(rows as f64);
        self.steps.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests answered with `status`, summed over endpoints (for tests and logs).
    pub fn requests_with_status(&self, status: u16) -> u64 {
        lock(&self.requests)
            .iter()
            .filter(|((_, s), _)| *s == status)
            .map(|(_, n)| n)
            .sum()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let requests = lock(&self.requests).clone();
        out.push_str(
            "# HELP burn_peft_requests_total HTTP requests answered, by endpoint and status.\n",
        );
        out.push_str("# TYPE burn_peft_requests_total counter\n");
        for ((endpoint, status), n) in &requests {
            let _ = writeln!(
                out,
                "burn_peft_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP burn_peft_request_errors_total Requests answered with a 4xx or 5xx status.\n",
        );
        out.push_str("# TYPE burn_peft_request_errors_total counter\n");
        let mut errors: BTreeMap<&str, u64> = BTreeMap::new();
        for ((endpoint, status), n) in &requests {
            if *status >= 400 {
                *errors.entry(endpoint).or_default() += n;
            }
        }
        for (endpoint, n) in errors {
            let _ = writeln!(
                out,
                "burn_peft_request_errors_total{{endpoint=\"{endpoint}\"}} {n}"
            );
        }
        out.push_str("# HELP burn_peft_request_duration_seconds Time until the response head is ready (a stream: once accepted, before its first token).\n");
        out.push_str("# TYPE burn_peft_request_duration_seconds histogram\n");
        for (endpoint, h) in lock(&self.latency).iter() {
            h.render(
                &mut out,
                "burn_peft_request_duration_seconds",
                &format!("endpoint=\"{endpoint}\""),
            );
        }
        out.push_str(
            "# HELP burn_peft_batch_size Sequences in each forward step of the scheduler.\n",
        );
        out.push_str("# TYPE burn_peft_batch_size histogram\n");
        lock(&self.batch_sizes).render(&mut out, "burn_peft_batch_size", "");
        let gauges = [
            (
                "burn_peft_queue_depth",
                "gauge",
                "Requests waiting for a batch slot.",
                self.queue_depth.load(Ordering::Relaxed) as u64,
            ),
            (
                "burn_peft_running_sequences",
                "gauge",
                "Sequences in the running batch.",
                self.running.load(Ordering::Relaxed) as u64,
            ),
            (
                "burn_peft_adapters_loaded",
                "gauge",
                "Adapters loaded (the base model not counted).",
                self.adapters_loaded.load(Ordering::Relaxed) as u64,
            ),
            (
                "burn_peft_generated_tokens_total",
                "counter",
                "Tokens generated.",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "burn_peft_prompt_tokens_total",
                "counter",
                "Prompt tokens processed.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "burn_peft_steps_total",
                "counter",
                "Forward steps run by the scheduler.",
                self.steps.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.record_request("completions", 200, 0.02);
        m.record_request("completions", 503, 0.001);
        m.record_batch(3);
        let text = m.render();
        assert!(
            text.contains("burn_peft_requests_total{endpoint=\"completions\",status=\"200\"} 1")
        );
        assert!(text.contains("burn_peft_request_errors_total{endpoint=\"completions\"} 1"));
        assert!(text.contains("burn_peft_batch_size_bucket{le=\"4\"} 1"));
        assert!(text.contains("burn_peft_batch_size_bucket{le=\"2\"} 0"));
        assert!(
            text.contains("burn_peft_request_duration_seconds_count{endpoint=\"completions\"} 2")
        );
        assert_eq!(m.requests_with_status(503), 1);
    }
}
