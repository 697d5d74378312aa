//! The flow and cookie settings travel with their generation: a new generation's
//! settings are stored in its slot before the flip and take effect with the
//! control word's one store. Before the fix they were one word for the whole
//! selector, stored just before the control word, so for a moment the serving
//! generation ran with the next one's `flow_idle` and `cookie_offset`.
#![deny(unsafe_code)]
use std::os::fd::AsFd;

use supervisor::{dataplane::Dataplane, maps::ListenerDataplane};
use supervisor_common::{BalanceMode, Control, Settings};
use supervisor_tests::{PinDir, require_root};

#[test]
fn a_new_generations_settings_reach_the_selector_only_with_the_flip() {
    require_root();
    let pins = PinDir::new();
    let mut dataplane =
        ListenerDataplane::load("settings", &pins.path().join("settings"), 1024).unwrap();
    // Socket arrays take only reuseport sockets.
    let socket = |_: u32| {
        supervisor::sockets::bind_reuseport("127.0.0.1:0".parse().unwrap(), 1 << 20, "settings")
            .unwrap()
    };
    let control = |generation: u32, slot: u32| Control {
        working_slot: slot as u8,
        balance_mode: BalanceMode::Flow as u8,
        socket_count: 1,
        generation,
    };
    let first = Settings {
        flow_idle_ms: 30_000,
        cookie_offset: 4,
    };
    let second = Settings {
        flow_idle_ms: 2_000,
        cookie_offset: 12,
    };

    let one = socket(1);
    let _gen1 = dataplane
        .install_generation(1, 1, &[one.as_fd()], first)
        .unwrap();
    dataplane.flip(control(1, 1));
    assert_eq!(dataplane.settings(), first);

    let two = socket(2);
    let _gen2 = dataplane
        .install_generation(2, 2, &[two.as_fd()], second)
        .unwrap();
    assert_eq!(
        dataplane.settings(),
        first,
        "generation 1 serves with its own settings until the flip"
    );
    assert_eq!(dataplane.slot_settings(2), second);
    dataplane.flip(control(2, 2));
    assert_eq!(dataplane.settings(), second);
    dataplane.unpin_all();
}
