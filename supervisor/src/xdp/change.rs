//! What an upgrade does to the XDP filter, planned before the new generation is
//! built (a bad rule refuses the upgrade with nothing changed) and applied at the
//! flip.
use anyhow::Result;

use super::{PreparedRuleset, ReadersGone, XdpFilter};
use crate::config::Config;

pub enum XdpChange {
    None,
    /// New rules for the running filter, built in fresh maps; switched in once an
    /// RCU grace period has passed since ruleset `after` was.
    Rules {
        prepared: Box<PreparedRuleset>,
        after: u32,
    },
    /// `[xdp]` appeared: attach at the flip.
    Start,
    /// `[xdp]` disappeared: detach at the flip.
    Remove,
}

impl XdpChange {
    /// Validates the new config's `[xdp]` against the running filter and builds
    /// its ruleset. Changes nothing the program sees.
    pub fn plan(running: Option<&XdpFilter>, config: &Config) -> Result<XdpChange> {
        Ok(match (running, &config.xdp) {
            (Some(filter), Some(new)) => XdpChange::Rules {
                prepared: Box::new(filter.prepare(new, &config.listener_addresses())?),
                after: filter.ruleset_generation(),
            },
            (None, Some(_)) => XdpChange::Start,
            (Some(_), None) => XdpChange::Remove,
            (None, None) => XdpChange::None,
        })
    }

    /// The grace period a ruleset switch needs, waited without blocking the
    /// event loop. Call it without holding the daemon's state lock.
    pub async fn readers_gone(&self) -> Option<ReadersGone> {
        match self {
            XdpChange::Rules { after, .. } => Some(ReadersGone::wait(*after).await),
            _ => None,
        }
    }

    /// Applies the change to the daemon's filter; returns what to report.
    pub fn apply(
        self,
        filter: &mut Option<XdpFilter>,
        config: &Config,
        readers: Option<ReadersGone>,
    ) -> Result<Option<String>> {
        Ok(match self {
            XdpChange::None => None,
            XdpChange::Rules { prepared, .. } => match filter.as_mut() {
                Some(filter) => {
                    filter.commit(*prepared, readers.unwrap_or(ReadersGone::NOT_WAITED))?;
                    Some(format!(
                        "xdp: new ruleset switched in on {}",
                        filter.interface()
                    ))
                }
                None => None,
            },
            XdpChange::Start => {
                let xdp = config.xdp.as_ref().expect("Start only with [xdp]");
                let started =
                    XdpFilter::start(xdp, &config.pin_dir(), &config.listener_addresses())?;
                let message = format!(
                    "xdp: filter attached to {} (link {})",
                    started.interface(),
                    started.link_id()
                );
                *filter = Some(started);
                Some(message)
            }
            XdpChange::Remove => match filter.take() {
                Some(removed) => {
                    let interface = removed.interface().to_string();
                    removed.remove()?;
                    Some(format!("xdp: filter removed from {interface}"))
                }
                None => None,
            },
        })
    }
}
