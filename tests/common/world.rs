//! The usual test world: a real Prosody (STARTTLS with TLS 1.3, SCRAM only,
//! the test CA), the exporter's account, and the OnSIP simulator attached to
//! Prosody as an XEP-0114 component.

use std::time::Duration;

use onsip_sim::{Account, SimConfig, Simulator};
use onsip_ua_exporter::config::Flags;
use tokio_util::sync::CancellationToken;

use super::exporter;
use super::prosody::Prosody;
use super::wait::eventually;

pub const DEADLINE: Duration = Duration::from_secs(20);
pub const XMPP_PASSWORD: &str = "xmpp-secret-0xC0FFEE";
pub const WEB_PASSWORD: &str = "web-portal-secret-0xBEEF";
/// The SIP addresses the exporter's account is authorized for.
pub const ADDRESSES: [&str; 2] = ["alice@acme.example", "bob@acme.example"];

pub struct World {
    pub prosody: Prosody,
    pub sim: Simulator,
    pub cancel: CancellationToken,
}

impl Drop for World {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Starts Prosody and the simulator (configured by `tweak`), and waits for
/// the simulator's components to be attached.
pub async fn world_with(tweak: impl FnOnce(&mut SimConfig)) -> World {
    world_with_prosody(|b| b, tweak).await
}

/// `world_with`, with the Prosody configuration adjusted by `prosody_tweak`.
pub async fn world_with_prosody(
    prosody_tweak: impl FnOnce(super::prosody::ProsodyBuilder) -> super::prosody::ProsodyBuilder,
    tweak: impl FnOnce(&mut SimConfig),
) -> World {
    let prosody = prosody_tweak(Prosody::builder().allow_tls13().sasl_plain(false)).start();
    prosody.register("exporter", XMPP_PASSWORD);
    let jid = prosody.jid("exporter");
    let mut account = Account::new(&jid, &ADDRESSES, WEB_PASSWORD);
    account.xmpp_password = XMPP_PASSWORD.into();
    let mut config = SimConfig::new(prosody.domain()).with_account(account);
    tweak(&mut config);
    let sim = Simulator::new(config);
    let cancel = CancellationToken::new();
    tokio::spawn(onsip_sim::attach_component(
        sim.clone(),
        prosody.component_addr(),
        prosody.component_secret().to_owned(),
        cancel.clone(),
    ));
    let world = World {
        prosody,
        sim,
        cancel,
    };
    world.wait_components().await;
    world
}

pub async fn world() -> World {
    world_with(|_| {}).await
}

impl World {
    /// Waits until both simulator components are attached to Prosody.
    pub async fn wait_components(&self) {
        let sim = self.sim.clone();
        eventually(DEADLINE, "simulator components attached", || {
            let ok = sim.components_connected();
            async move { ok.then_some(()) }
        })
        .await;
    }

    /// Flags for an exporter logging into this world's Prosody over TLS.
    pub fn flags(&self) -> Flags {
        Flags {
            sip_address: Some(ADDRESSES[0].into()),
            ..exporter::flags_for(
                &self.prosody.jid("exporter"),
                self.prosody.c2s_addr(),
                self.prosody.domain(),
                Some(self.prosody.ca_cert_path()),
            )
        }
    }

    /// Starts an in-process exporter with `flags`.
    pub async fn exporter(&self, flags: Flags, xmpp_password: &str) -> exporter::Running {
        exporter::start(flags, xmpp_password, Some(WEB_PASSWORD)).await
    }

    /// Our subscriptions at the simulator.
    pub fn our_subscriptions(&self) -> usize {
        self.sim
            .subscriptions()
            .into_iter()
            .filter(|s| s.jid.starts_with("exporter@"))
            .count()
    }
}

/// `name{domain="acme.example",user="…"}`.
pub fn series(name: &str, address: &str) -> String {
    let (user, domain) = address.split_once('@').unwrap_or((address, ""));
    format!("{name}{{domain=\"{domain}\",user=\"{user}\"}}")
}
