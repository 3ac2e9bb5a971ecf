//! Pure scenario generators for the demo and the benchmarks: a seeded fleet
//! of phones across a few SIP domains that come online, refresh their
//! registrations and go away (sometimes without a retract, as when OnSIP
//! misses one), and the event plan of the load mode.
//!
//! No I/O, no clock: callers pass `now`, and the same seed and times give
//! the same events. `drive` applies them to a [`crate::Simulator`].

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::Account;
use crate::pubsub::Registration;

/// A tiny deterministic PRNG (SplitMix64): reproducible across platforms
/// and dependency upgrades, which matters for golden demo output.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`0` when `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// `n` lower-case hex digits.
    pub fn hex(&mut self, n: usize) -> String {
        let mut s = String::with_capacity(n);
        while s.len() < n {
            s.push_str(&format!("{:016x}", self.next_u64()));
        }
        s.truncate(n);
        s
    }

    /// Exponentially distributed duration with the given mean, capped at 10×.
    pub fn exp(&mut self, mean: Duration) -> Duration {
        let u = self.unit();
        let f = (-(1.0 - u).ln()).min(10.0);
        Duration::from_secs_f64(mean.as_secs_f64() * f)
    }
}

/// SIP User-Agent strings of phones and softphones seen on OnSIP-like fleets.
pub const USER_AGENTS: &[&str] = &[
    "Yealink SIP-T54W 96.86.0.70",
    "Yealink SIP-T46U 108.86.0.45",
    "Yealink SIP-T33G 124.86.0.40",
    "Polycom/6.4.3 VVX-450",
    "PolycomVVX-VVX_411-UA/6.3.1.8427",
    "Grandstream GXP2170 1.0.11.64",
    "Cisco/SPA504G-7.6.2f",
    "snom D785/10.1.141.13",
    "OBIHAI/OBi202-3.2.2.5921EX",
    "Fanvil X4U 2.12.14",
    "Zoiper rv2.10.20.3",
    "Linphone/5.2.4 (belle-sip/5.2.0)",
    "Bria 6 release 6.5.4 stamp 110233",
    "SIP.js/0.21.2",
];

const USERS: &[&str] = &[
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "mallory",
    "niaj",
    "oscar",
    "peggy",
    "rupert",
    "sybil",
    "trent",
    "victor",
    "walter",
    "reception",
    "sales",
    "support",
    "billing",
    "conference",
];

/// What a fleet looks like and how it behaves.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// RNG seed.
    pub seed: u64,
    /// SIP domains.
    pub domains: Vec<String>,
    /// SIP users per domain (names repeat with a number past the built-in list).
    pub users_per_domain: usize,
    /// Each address gets 1..=this many devices.
    pub max_devices_per_address: usize,
    /// Probability a device is online at the start.
    pub online_fraction: f64,
    /// SIP registration lifetime; devices refresh at half of it.
    pub registration_ttl: Duration,
    /// Mean time a device stays online.
    pub mean_online: Duration,
    /// Mean time a device stays offline.
    pub mean_offline: Duration,
    /// Probability that going offline sends no retract (a stale registration).
    pub stale_fraction: f64,
    /// The one account owning every address (what the demo exporter logs in as).
    pub owner_jid: String,
    /// Its web-portal password (for `authorize-plain`).
    pub web_password: String,
    /// Its XMPP password (for the c2s face).
    pub xmpp_password: String,
}

impl FleetSpec {
    /// A lively demo: three domains, a few users each, short registrations
    /// so that something happens every few seconds.
    pub fn demo(xmpp_domain: &str) -> Self {
        FleetSpec {
            seed: 42,
            domains: vec![
                "acme.example".into(),
                "globex.example".into(),
                "initech.example".into(),
            ],
            users_per_domain: 6,
            max_devices_per_address: 2,
            online_fraction: 0.7,
            registration_ttl: Duration::from_secs(120),
            mean_online: Duration::from_secs(600),
            mean_offline: Duration::from_secs(120),
            stale_fraction: 0.05,
            owner_jid: format!("demo@{}", xmpp_domain.to_lowercase()),
            web_password: "demo-web-password".into(),
            xmpp_password: "demo-xmpp-password".into(),
        }
    }
}

/// One thing that happens to a phone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetEvent {
    /// A registration or refresh: publish this item.
    Register {
        /// SIP address.
        address: String,
        /// The item.
        registration: Registration,
    },
    /// A device went offline: retract this item.
    Unregister {
        /// SIP address.
        address: String,
        /// Item id.
        item_id: String,
    },
}

#[derive(Debug, Clone)]
enum DeviceState {
    Offline {
        back_at: DateTime<Utc>,
    },
    Online {
        item_id: String,
        contact: String,
        received: String,
        next_refresh: DateTime<Utc>,
        leaves_at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone)]
struct Device {
    address: String,
    user_agent: &'static str,
    lan_ip: String,
    public_ip: String,
    state: DeviceState,
}

/// A fleet of phones with their schedule.
#[derive(Debug, Clone)]
pub struct Fleet {
    spec: FleetSpec,
    rng: Rng,
    addresses: Vec<String>,
    devices: Vec<Device>,
}

fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::zero())
}

/// Most events one device may produce per `advance` call: bounds the work
/// when `now` jumps far ahead.
const MAX_STEPS_PER_DEVICE: usize = 1000;

impl Fleet {
    /// Build the fleet; devices due online at start register on the first
    /// [`Self::advance`] at `now`.
    pub fn new(spec: FleetSpec, now: DateTime<Utc>) -> Self {
        let mut rng = Rng::new(spec.seed);
        let mut addresses = Vec::new();
        let mut devices = Vec::new();
        for (di, domain) in spec.domains.iter().enumerate() {
            let public_ip = if di % 2 == 0 {
                format!("203.0.113.{}", 10 + rng.below(200))
            } else {
                format!("198.51.100.{}", 10 + rng.below(200))
            };
            let subnet = rng.below(250);
            for u in 0..spec.users_per_domain {
                let user = match (USERS.get(u), u / USERS.len()) {
                    (Some(name), _) => (*name).to_owned(),
                    (None, round) => format!("{}{}", USERS[u % USERS.len()], round),
                };
                let address = format!("{user}@{}", domain.to_lowercase());
                let n = 1 + rng.below(spec.max_devices_per_address.max(1));
                for _ in 0..n {
                    let back_at = if rng.chance(spec.online_fraction) {
                        now
                    } else {
                        add(now, rng.exp(spec.mean_offline))
                    };
                    devices.push(Device {
                        address: address.clone(),
                        user_agent: USER_AGENTS[rng.below(USER_AGENTS.len())],
                        lan_ip: format!("192.168.{subnet}.{}", 20 + rng.below(200)),
                        public_ip: public_ip.clone(),
                        state: DeviceState::Offline { back_at },
                    });
                }
                addresses.push(address);
            }
        }
        Fleet {
            spec,
            rng,
            addresses,
            devices,
        }
    }

    /// The single account owning every address.
    pub fn accounts(&self) -> Vec<Account> {
        vec![Account {
            jid: self.spec.owner_jid.clone(),
            sip_addresses: self.addresses.clone(),
            web_password: self.spec.web_password.clone(),
            xmpp_password: self.spec.xmpp_password.clone(),
        }]
    }

    /// Every SIP address, in creation order.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// Number of devices (online or not).
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// When the next event is due.
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        self.devices
            .iter()
            .map(|d| match &d.state {
                DeviceState::Offline { back_at } => *back_at,
                DeviceState::Online {
                    next_refresh,
                    leaves_at,
                    ..
                } => (*next_refresh).min(*leaves_at),
            })
            .min()
    }

    /// Every event due at or before `now`, in time order.
    pub fn advance(&mut self, now: DateTime<Utc>) -> Vec<FleetEvent> {
        let mut due: Vec<(DateTime<Utc>, usize, FleetEvent)> = Vec::new();
        let ttl = self.spec.registration_ttl;
        let half = ttl / 2;
        for (i, dev) in self.devices.iter_mut().enumerate() {
            for _ in 0..MAX_STEPS_PER_DEVICE {
                match &mut dev.state {
                    DeviceState::Offline { back_at } => {
                        let t = *back_at;
                        if t > now {
                            break;
                        }
                        let user = dev.address.split('@').next().unwrap_or_default();
                        let item_id = self.rng.hex(32);
                        let contact = format!(
                            "sip:{user}@{}:5060;rinstance={}",
                            dev.lan_ip,
                            self.rng.hex(16)
                        );
                        let received =
                            format!("sip:{}:{}", dev.public_ip, 1024 + self.rng.below(60000));
                        due.push((
                            t,
                            i,
                            FleetEvent::Register {
                                address: dev.address.clone(),
                                registration: Registration {
                                    item_id: item_id.clone(),
                                    contact: contact.clone(),
                                    received: received.clone(),
                                    device: dev.user_agent.to_owned(),
                                    expires: add(t, ttl),
                                },
                            },
                        ));
                        dev.state = DeviceState::Online {
                            item_id,
                            contact,
                            received,
                            next_refresh: add(t, half),
                            leaves_at: add(t, self.rng.exp(self.spec.mean_online)),
                        };
                    }
                    DeviceState::Online {
                        item_id,
                        contact,
                        received,
                        next_refresh,
                        leaves_at,
                    } => {
                        let t = (*next_refresh).min(*leaves_at);
                        if t > now {
                            break;
                        }
                        if *leaves_at <= *next_refresh {
                            if !self.rng.chance(self.spec.stale_fraction) {
                                due.push((
                                    t,
                                    i,
                                    FleetEvent::Unregister {
                                        address: dev.address.clone(),
                                        item_id: item_id.clone(),
                                    },
                                ));
                            }
                            dev.state = DeviceState::Offline {
                                back_at: add(t, self.rng.exp(self.spec.mean_offline)),
                            };
                        } else {
                            due.push((
                                t,
                                i,
                                FleetEvent::Register {
                                    address: dev.address.clone(),
                                    registration: Registration {
                                        item_id: item_id.clone(),
                                        contact: contact.clone(),
                                        received: received.clone(),
                                        device: dev.user_agent.to_owned(),
                                        expires: add(t, ttl),
                                    },
                                },
                            ));
                            *next_refresh = add(t, half.max(Duration::from_secs(1)));
                        }
                    }
                }
            }
        }
        due.sort_by_key(|a| (a.0, a.1));
        due.into_iter().map(|(_, _, e)| e).collect()
    }
}

/// The event plan of the load mode: random devices register, refresh, and
/// (with probability `churn`) go away, over a fixed set of addresses.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    rng: Rng,
    addresses: Vec<String>,
    slots: Vec<(usize, Option<String>)>,
    churn: f64,
    ttl: Duration,
}

impl LoadPlan {
    /// `devices_per_address` device slots per address, all offline at first.
    pub fn new(seed: u64, addresses: Vec<String>, devices_per_address: usize, churn: f64) -> Self {
        let slots = (0..addresses.len())
            .flat_map(|a| std::iter::repeat_n((a, None), devices_per_address.max(1)))
            .collect();
        LoadPlan {
            rng: Rng::new(seed),
            addresses,
            slots,
            churn: churn.clamp(0.0, 1.0),
            ttl: Duration::from_secs(3600),
        }
    }

    /// The next event (`None` only when there are no addresses).
    pub fn next_event(&mut self, now: DateTime<Utc>) -> Option<FleetEvent> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let i = self.rng.below(n);
        let leave = self.rng.chance(self.churn);
        let (a, item) = self.slots.get_mut(i)?;
        let address = self.addresses.get(*a)?.clone();
        match item {
            Some(id) if leave => {
                let item_id = id.clone();
                *item = None;
                Some(FleetEvent::Unregister { address, item_id })
            }
            _ => {
                let id = item.get_or_insert_with(|| self.rng.hex(32)).clone();
                let user = address.split('@').next().unwrap_or_default().to_owned();
                Some(FleetEvent::Register {
                    address,
                    registration: Registration {
                        contact: format!("sip:{user}@10.0.{}.{}:5060", i / 250 % 250, i % 250),
                        received: format!("sip:198.51.100.{}:{}", i % 250, 5060 + i % 1000),
                        device: USER_AGENTS[i % USER_AGENTS.len()].to_owned(),
                        expires: add(now, self.ttl),
                        item_id: id,
                    },
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::collections::HashMap;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, 9, 0, 0)
            .single()
            .expect("valid time")
    }

    #[test]
    fn same_seed_same_story() {
        let run = || {
            let mut f = Fleet::new(FleetSpec::demo("example.com"), t0());
            let mut all = Vec::new();
            for m in 0..60 {
                all.extend(f.advance(t0() + chrono::Duration::minutes(m)));
            }
            all
        };
        let a = run();
        assert!(!a.is_empty());
        assert_eq!(a, run());
    }

    #[test]
    fn phones_come_refresh_and_go_consistently() {
        let mut f = Fleet::new(FleetSpec::demo("example.com"), t0());
        let first = f.advance(t0());
        assert!(first
            .iter()
            .all(|e| matches!(e, FleetEvent::Register { .. })));
        assert!(!first.is_empty(), "some phones start online");
        // Replay events and check every retract names a live item and every
        // refresh keeps its id.
        let mut live: HashMap<String, String> = HashMap::new(); // item -> address
        let (mut refreshes, mut retracts) = (0, 0);
        let mut all = first;
        for m in 1..=180 {
            all.extend(f.advance(t0() + chrono::Duration::minutes(m)));
        }
        for e in &all {
            match e {
                FleetEvent::Register {
                    address,
                    registration,
                } => {
                    assert!(registration.expires > t0());
                    assert!(USER_AGENTS.contains(&registration.device.as_str()));
                    if live
                        .insert(registration.item_id.clone(), address.clone())
                        .is_some()
                    {
                        refreshes += 1;
                    }
                }
                FleetEvent::Unregister { address, item_id } => {
                    assert_eq!(live.remove(item_id).as_ref(), Some(address));
                    retracts += 1;
                }
            }
        }
        assert!(
            refreshes > 0 && retracts > 0,
            "refreshes {refreshes}, retracts {retracts}"
        );
        assert_eq!(f.accounts()[0].sip_addresses.len(), 18);
    }

    #[test]
    fn far_jump_is_bounded() {
        let mut spec = FleetSpec::demo("example.com");
        spec.registration_ttl = Duration::from_secs(2);
        let mut f = Fleet::new(spec, t0());
        let ev = f.advance(t0() + chrono::Duration::days(365));
        assert!(ev.len() <= f.device_count() * MAX_STEPS_PER_DEVICE);
    }

    #[test]
    fn load_plan_churns_and_refreshes() {
        let addrs: Vec<String> = (0..10).map(|i| format!("u{i}@load.example")).collect();
        let mut p = LoadPlan::new(7, addrs, 3, 0.2);
        let mut live = std::collections::HashSet::new();
        for _ in 0..2000 {
            match p.next_event(t0()).expect("event") {
                FleetEvent::Register { registration, .. } => {
                    live.insert(registration.item_id);
                }
                FleetEvent::Unregister { item_id, .. } => {
                    assert!(live.remove(&item_id), "retract of a live item");
                }
            }
        }
        assert!(live.len() <= 30);
        assert!(LoadPlan::new(1, Vec::new(), 3, 0.5)
            .next_event(t0())
            .is_none());
    }
}
