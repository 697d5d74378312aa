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
    Ok(())
}
