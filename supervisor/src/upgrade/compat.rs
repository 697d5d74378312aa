//! What an upgrade may change, and what needs a supervisor restart.
use crate::{config::Config, error::InputError};

/// Listeners are the identity of the reuseport groups and the pins: they cannot
/// change under a running supervisor (restart it for that). Everything else can.
pub fn check_compatible(current: &Config, new: &Config) -> Result<(), InputError> {
    if current.service.name != new.service.name {
        return Err(InputError::new(format!(
            "{}: service.name changed from {:?} to {:?}; that needs a supervisor restart",
            new.path.display(),
            current.service.name,
            new.service.name
        )));
    }
    let describe = |c: &Config| {
        c.listeners
            .iter()
            .map(|l| format!("{}={}", l.name, l.address))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if describe(current) != describe(new) {
        return Err(InputError::new(format!(
            "{}: listeners changed from [{}] to [{}]; names and addresses cannot change on upgrade (restart the supervisor)",
            new.path.display(),
            describe(current),
            describe(new)
        )));
    }
    for (old, new_listener) in current.listeners.iter().zip(new.listeners.iter()) {
        if old.flow_table_size != new_listener.flow_table_size {
            return Err(InputError::new(format!(
                "{}: listener {:?}: flow_table_size cannot change on upgrade (the table is sized when the selector loads; restart the supervisor)",
                new.path.display(),
                new_listener.name
            )));
        }
    }
    if current.service.bpffs != new.service.bpffs
        || current.service.runtime_dir != new.service.runtime_dir
    {
        return Err(InputError::new(format!(
            "{}: bpffs and runtime_dir cannot change on upgrade (restart the supervisor)",
            new.path.display()
        )));
    }
    let metrics = |c: &Config| c.metrics.as_ref().map(|m| m.listen.clone());
    if metrics(current) != metrics(new) {
        return Err(InputError::new(format!(
            "{}: metrics.listen changed from {:?} to {:?}; the endpoint is bound at start, so that needs a supervisor restart",
            new.path.display(),
            metrics(current),
            metrics(new)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(service: &str, listen: &str) -> Config {
        let text = format!(
            "[service]\nname = \"svc\"\ncommand = [\"/bin/true\"]\n{service}\n[[listen]]\nname = \"dns\"\n{listen}\n"
        );
        Config::parse(&text, Path::new("new.toml")).unwrap()
    }

    #[test]
    fn workers_command_and_timeouts_may_change() {
        let current = config("", "address = \"127.0.0.1:53\"");
        let new = config(
            "workers = 8\nready_timeout = \"3s\"\ndrain_timeout = \"1m\"",
            "address = \"127.0.0.1:53\"\nbalance = \"hash\"",
        );
        check_compatible(&current, &new).unwrap();
    }

    #[test]
    fn listener_address_and_flow_table_need_a_restart() {
        let current = config("", "address = \"127.0.0.1:53\"");
        let moved = config("", "address = \"127.0.0.1:54\"");
        let message = check_compatible(&current, &moved).unwrap_err().to_string();
        assert!(message.contains("new.toml: listeners changed"), "{message}");
        assert!(message.contains("restart"), "{message}");
        let resized = config("", "address = \"127.0.0.1:53\"\nflow_table_size = 1024");
        let message = check_compatible(&current, &resized)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("flow_table_size cannot change"),
            "{message}"
        );
    }

    #[test]
    fn the_metrics_endpoint_needs_a_restart() {
        let current = config("", "address = \"127.0.0.1:53\"");
        let text = "[service]\nname = \"svc\"\ncommand = [\"/bin/true\"]\n[metrics]\nlisten = \"127.0.0.1:9464\"\n[[listen]]\nname = \"dns\"\naddress = \"127.0.0.1:53\"\n";
        let new = Config::parse(text, Path::new("new.toml")).unwrap();
        let message = check_compatible(&current, &new).unwrap_err().to_string();
        assert!(message.contains("metrics.listen changed"), "{message}");
        check_compatible(&new, &new).unwrap();
    }

    #[test]
    fn pin_and_runtime_directories_need_a_restart() {
        let current = config("", "address = \"127.0.0.1:53\"");
        let new = config("runtime_dir = \"/run/other\"", "address = \"127.0.0.1:53\"");
        let message = check_compatible(&current, &new).unwrap_err().to_string();
        assert!(
            message.contains("bpffs and runtime_dir cannot change"),
            "{message}"
        );
    }
}
