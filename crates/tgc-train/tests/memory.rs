//! `retain_freed_memory` sets the option mimalloc itself calls `purge_delay`: the index
//! is checked against mimalloc's parsing of `MIMALLOC_PURGE_DELAY` in a child process
//! (mimalloc reads the environment once, so the parent cannot change it for itself).

use std::process::Command;

/// Runs this test binary again with `MIMALLOC_PURGE_DELAY=value`, executing only
/// `child_reports_purge_delay`, and returns what that child printed.
fn child_purge_delay(value: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["child_reports_purge_delay", "--exact", "--nocapture"])
        .env("MIMALLOC_PURGE_DELAY", value)
        .env("TGC_MEMORY_TEST_CHILD", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "child failed: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("purge_delay="))
        .unwrap_or_else(|| panic!("child printed no purge_delay: {stdout}"))
        .to_string()
}

#[test]
fn child_reports_purge_delay() {
    if std::env::var_os("TGC_MEMORY_TEST_CHILD").is_none() {
        return; // only meaningful when run by the tests below
    }
    // The environment variable wins over the call.
    let delay = tgc_train::retain_freed_memory();
    println!("purge_delay={delay}");
}

#[test]
fn the_option_index_is_mimallocs_purge_delay() {
    // Two values nothing else uses: whatever index we read, mimalloc put them there
    // only if it is the option named PURGE_DELAY.
    assert_eq!(child_purge_delay("4321"), "4321");
    assert_eq!(child_purge_delay("17"), "17");
}

#[test]
fn without_the_variable_freed_memory_is_kept() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return; // the variable wins by design; covered by the test above
    }
    assert_eq!(tgc_train::retain_freed_memory(), -1);
    assert_eq!(tgc_train::memory::purge_delay(), -1);
}
