//! Real-time drivers over the pure generators in `fleet`: play a fleet
//! scenario against a [`Simulator`] for the demo, or publish at a target
//! rate for benchmarks. Both stop on their `CancellationToken`.

use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, FleetEvent, LoadPlan};
use crate::sim::Simulator;

/// Apply generated events to the simulator.
pub fn apply(sim: &Simulator, events: impl IntoIterator<Item = FleetEvent>) {
    for e in events {
        match e {
            FleetEvent::Register {
                address,
                registration,
            } => sim.publish(&address, registration),
            FleetEvent::Unregister { address, item_id } => {
                sim.unregister_phone(&address, &item_id);
            }
        }
    }
}

/// Play `fleet` in real time: every `tick`, apply the events due by now.
/// Returns the fleet (for inspection) when cancelled.
pub async fn run_fleet(
    sim: Simulator,
    mut fleet: Fleet,
    tick: Duration,
    cancel: CancellationToken,
) -> Fleet {
    let mut interval = tokio::time::interval(tick.max(Duration::from_millis(10)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return fleet,
            _ = interval.tick() => apply(&sim, fleet.advance(Utc::now())),
        }
    }
}

/// What the load generator should do.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// SIP addresses to publish on (usually those the exporter is authorized for).
    pub addresses: Vec<String>,
    /// Device slots per address.
    pub devices_per_address: usize,
    /// Target events per second; `0` publishes as fast as the links drain.
    pub events_per_second: u32,
    /// Probability an event on an online device is its retract.
    pub churn: f64,
    /// How long to run.
    pub duration: Duration,
    /// RNG seed.
    pub seed: u64,
    /// Back-pressure: pause publishing while more stanzas than this are
    /// queued on links (writers not keeping up).
    pub max_queued: usize,
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            addresses: Vec::new(),
            devices_per_address: 2,
            events_per_second: 1000,
            churn: 0.1,
            duration: Duration::from_secs(10),
            seed: 1,
            max_queued: 10_000,
        }
    }
}

/// What the load generator did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadReport {
    /// Events generated (publishes + retracts).
    pub events: u64,
    /// Publishes.
    pub published: u64,
    /// Retracts.
    pub retracted: u64,
    /// Stanzas the simulator handed to links meanwhile.
    pub delivered: u64,
    /// Stanzas with nowhere to go meanwhile.
    pub undeliverable: u64,
    /// Wall time spent.
    pub elapsed: Duration,
    /// Achieved events per second.
    pub events_per_second: f64,
    /// Times publishing paused for back-pressure.
    pub backpressure_waits: u64,
    /// Most stanzas seen queued.
    pub max_queued: usize,
}

/// Events published between two clock checks.
const BATCH: u64 = 256;
const TICK: Duration = Duration::from_millis(5);

/// Publish at `spec.events_per_second` for `spec.duration` (or until
/// `cancel`), pausing while links lag by more than `spec.max_queued`.
pub async fn run_load(sim: &Simulator, spec: LoadSpec, cancel: CancellationToken) -> LoadReport {
    let mut plan = LoadPlan::new(
        spec.seed,
        spec.addresses.clone(),
        spec.devices_per_address,
        spec.churn,
    );
    let before = sim.stats();
    let start = Instant::now();
    let mut report = LoadReport::default();
    let total = if spec.events_per_second == 0 {
        u64::MAX
    } else {
        (spec.events_per_second as f64 * spec.duration.as_secs_f64()).ceil() as u64
    };
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

    'outer: while report.events < total && start.elapsed() < spec.duration && !cancel.is_cancelled()
    {
        let target = if spec.events_per_second == 0 {
            report.events + BATCH
        } else {
            ((spec.events_per_second as f64 * start.elapsed().as_secs_f64()) as u64 + 1).min(total)
        };
        while report.events < target {
            let queued = sim.queued();
            report.max_queued = report.max_queued.max(queued);
            if queued > spec.max_queued {
                report.backpressure_waits += 1;
                let remaining = spec.duration.saturating_sub(start.elapsed());
                tokio::select! {
                    _ = cancel.cancelled() => break 'outer,
                    _ = sim.wait_queue_below(spec.max_queued / 2, remaining) => {}
                }
                if start.elapsed() >= spec.duration {
                    break 'outer;
                }
            }
            let now = Utc::now();
            for _ in 0..BATCH.min(target - report.events) {
                let Some(e) = plan.next_event(now) else {
                    break 'outer;
                };
                match &e {
                    FleetEvent::Register { .. } => report.published += 1,
                    FleetEvent::Unregister { .. } => report.retracted += 1,
                }
                apply(sim, [e]);
                report.events += 1;
            }
            // Let the link writers run between batches.
            tokio::task::yield_now().await;
        }
        if spec.events_per_second != 0 {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = interval.tick() => {}
            }
        }
    }
    let after = sim.stats();
    report.elapsed = start.elapsed();
    report.delivered = after.delivered - before.delivered;
    report.undeliverable = after.undeliverable - before.undeliverable;
    let secs = report.elapsed.as_secs_f64();
    report.events_per_second = if secs > 0.0 {
        report.events as f64 / secs
    } else {
        0.0
    };
    report
}
