//! A new build's selector takes effect on re-exec without loss: the reuseport
//! group runs the new program (the kernel's own run counts say so), the pins name
//! it, and a pinned map whose definition changed is replaced by a new one filled
//! from it.

#![deny(unsafe_code)]

use std::{path::Path, time::Duration};

use aya::{
    maps::{Array, Map, MapData, MapInfo},
    programs::ProgramInfo,
};
use supervisor_tests::{
    BackgroundLoad, LoadConfig, PinDir, ServiceConfig, Supervisor, TempDir, TestNet, bin_path,
    require_root, selector_variant_path,
    supervisor::{selected_total, worker_pids},
};

fn selector(dir: &Path) -> ProgramInfo {
    ProgramInfo::from_pin(dir.join("selector")).expect("the pinned selector")
}

/// Runs of program `id` so far (0 if the kernel no longer has it).
fn runs(id: u32) -> Option<u64> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .map(|p| p.run_count())
}

/// Waits until the daemon's log mentions `text` `times` times.
fn wait_log(supervisor: &Supervisor, text: &str, times: usize) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, err) = supervisor.logs();
        if err.matches(text).count() >= times {
            return err;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {times}x {text:?} in the log:\n{err}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that the group runs program `new` and no longer `old`: under traffic
/// the kernel counts runs of `new` only.
fn assert_group_runs(supervisor: &Supervisor, new: u32, old: u32) {
    let (new_before, old_before) = (runs(new).unwrap(), runs(old));
    let generation = supervisor.serving_generation();
    let selected = selected_total(&supervisor.status_json(), generation);
    // Traffic is running: wait until the selector has picked more sockets.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while selected_total(&supervisor.status_json(), generation) < selected + 200 {
        assert!(std::time::Instant::now() < deadline, "no traffic counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        runs(new).unwrap() > new_before,
        "the new selector did not run"
    );
    // The old program is either unchanged or gone (freed once neither the group
    // nor a pin holds it).
    match (old_before, runs(old)) {
        (_, None) => {}
        (Some(before), Some(now)) => assert_eq!(now, before, "the old selector still runs"),
        (None, Some(_)) => panic!("program {old} came back"),
    }
}

#[test]
fn reexec_into_a_changed_selector_under_load() {
    require_root();
    let variant = selector_variant_path();
    let net = TestNet::new();
    let pins = PinDir::new();
    let run = TempDir::new("selector-swap");
    let config = ServiceConfig::echo(3, "127.0.0.1:6000".parse().unwrap(), &pins, run.path());
    let target = config.address;
    let dir = pins.path().join("echo").join("echo");
    let mut supervisor = Supervisor::start(&net, config);
    let before = supervisor.status_json();
    let pins_before = pins.entries();
    // The kernel counts program runs while this fd is open.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let original = selector(&dir);

    let mut load = LoadConfig::new(target);
    load.rate = Some(4000);
    load.duration = Some(Duration::from_secs(60));
    let background = BackgroundLoad::start(&net, load);
    std::thread::sleep(Duration::from_millis(300));

    supervisor.reexec_into(&variant);
    wait_log(&supervisor, "maps reused", 1);
    let swapped = selector(&dir);
    assert_ne!(
        swapped.id(),
        original.id(),
        "the pinned selector is the old one"
    );
    assert_ne!(
        swapped.tag(),
        original.tag(),
        "the variant's program is the same"
    );
    assert_group_runs(&supervisor, swapped.id(), original.id());

    // And back: the real build's program again, on the same maps.
    supervisor.reexec_into(&bin_path("supervisor"));
    wait_log(&supervisor, "maps reused", 2);
    let back = selector(&dir);
    assert_eq!(back.tag(), original.tag());
    assert_group_runs(&supervisor, back.id(), swapped.id());

    // The same binary again: nothing to replace.
    supervisor.reexec_into(&bin_path("supervisor"));
    let log = wait_log(&supervisor, "re-executed", 3);
    assert_eq!(log.matches("selector replaced").count(), 2, "{log}");
    assert_eq!(selector(&dir).id(), back.id());

    let report = background.finish();
    eprintln!("load across the swaps: {report}");
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(report.duplicated, 0, "{report}");
    let after = supervisor.status_json();
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(worker_pids(&after, 1), worker_pids(&before, 1));
    assert_eq!(pins.entries(), pins_before, "pins left behind or missing");

    // An upgrade works on the swapped selector.
    supervisor.upgrade_ok();
    assert_eq!(supervisor.serving_generation(), 2);
    supervisor.stop();
    pins.assert_empty_after_stop();
}

/// Pins, in place of the map at `pin`, a map like it with one more entry; returns
/// the map that was pinned there, and its info.
fn pin_longer_map(pin: &Path) -> (Map, MapInfo) {
    let real = MapInfo::from_pin(pin).unwrap();
    let longer = aya_obj::Map::new_from_params(
        real.map_type().unwrap() as u32,
        real.key_size(),
        real.value_size(),
        real.max_entries() + 1,
        real.map_flags(),
    );
    let longer = MapData::create(longer, "test_longer", None).unwrap();
    let old = Map::from_map_data(MapData::from_pin(pin).unwrap()).unwrap();
    let temporary = pin.with_file_name("test_longer");
    longer.pin(&temporary).unwrap();
    std::fs::rename(&temporary, pin).unwrap();
    (old, real)
}

#[test]
fn reexec_migrates_a_map_whose_definition_changed() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let run = TempDir::new("selector-migrate");
    let config = ServiceConfig::echo(2, "127.0.0.1:6000".parse().unwrap(), &pins, run.path());
    let target = config.address;
    let dir = pins.path().join("echo").join("echo");
    let mut supervisor = Supervisor::start(&net, config);
    let pins_before = pins.entries();
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let original = selector(&dir);

    // Stand in for a build whose COUNTERS and CONTROL have other definitions:
    // pin arrays one entry longer in their place (the running program and
    // supervisor keep the real ones). The control words are copied over, as an
    // older build's would hold them; a broken migration of them would leave the
    // new selector without a generation to select (no `selected` counted below).
    let counters = dir.join("counters");
    let real_counters = pin_longer_map(&counters);
    let control = dir.join("control");
    let real_control = pin_longer_map(&control);
    {
        let real = Array::<_, u64>::try_from(&real_control.0).unwrap();
        let mut other = Map::Array(MapData::from_pin(&control).unwrap());
        let mut other = Array::<_, u64>::try_from(&mut other).unwrap();
        for index in 0..real.len() {
            other.set(index, real.get(&index, 0).unwrap(), 0).unwrap();
        }
    }

    let mut load = LoadConfig::new(target);
    load.rate = Some(4000);
    load.duration = Some(Duration::from_secs(60));
    let background = BackgroundLoad::start(&net, load);
    std::thread::sleep(Duration::from_millis(300));

    supervisor.reexec_into(&bin_path("supervisor"));
    let log = wait_log(&supervisor, "maps migrated", 1);
    assert!(log.contains("CONTROL, COUNTERS"), "{log}");
    for (pin, real) in [(&counters, real_counters), (&control, real_control)] {
        let real = real.1;
        let pinned = MapInfo::from_pin(pin).unwrap();
        assert_eq!(
            pinned.max_entries(),
            real.max_entries(),
            "{} is not this build's",
            pin.display()
        );
        assert_ne!(pinned.id(), real.id(), "{} is the old map", pin.display());
    }
    let swapped = selector(&dir);
    assert_ne!(swapped.id(), original.id());
    // The new program counts into the new COUNTERS, which status reads.
    assert_group_runs(&supervisor, swapped.id(), original.id());

    let report = background.finish();
    eprintln!("load across the swaps: {report}");
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(report.duplicated, 0, "{report}");
    assert_eq!(pins.entries(), pins_before, "pins left behind or missing");
    supervisor.upgrade_ok();
    supervisor.stop();
    pins.assert_empty_after_stop();
}
