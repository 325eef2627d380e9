//! Builds the bundled guest (kernel + user program) from `../guest-kernel` for
//! `x86_64-unknown-none` and hands their paths to the crate, which embeds them.
//!
//! A fresh machine lacks the target and `RUSTUP_AUTO_INSTALL=0` stops
//! `rust-toolchain.toml` from installing it, so this script installs it with
//! `rustup target add` when it is missing: the README's commands need no manual step.
//!
//! Fuzz builds (`cargo fuzz`, which passes `--cfg fuzzing`, `fuzz/`) embed
//! empty images instead: the fuzz targets boot no guest, and their nightly
//! toolchain need not have the guest's target.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("vmm-core/ has a parent")
        .to_path_buf();
    let guest = root.join("guest-kernel");
    for p in [
        "guest-kernel/kernel",
        "guest-kernel/user",
        "guest-kernel/Cargo.toml",
        "guest-kernel/Cargo.lock",
        "guest-kernel/.cargo",
        "abi/src",
        "abi/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }

    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    if env::var_os("CARGO_CFG_FUZZING").is_some() {
        for name in ["kernel", "user"] {
            let dst = out.join(format!("guest-{name}.elf"));
            std::fs::write(&dst, b"").unwrap_or_else(|e| panic!("cannot write {}: {e}", dst.display()));
        }
        return;
    }

    ensure_target();

    let target_dir = guest.join("target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args([
            "build",
            "--release",
            "--offline",
            "--locked",
            "--target",
            GUEST_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings must not leak into the guest build: RUSTFLAGS would
    // replace the guest's own target configuration, CARGO_* would retarget it.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let keep = k == "CARGO_HOME" || k == "CARGO" || k == "RUSTUP_HOME" || k == "RUSTUP_TOOLCHAIN";
        if !keep
            && (k.starts_with("CARGO_")
                || k.starts_with("RUSTC")
                || k == "RUSTFLAGS"
                || k == "RUSTDOCFLAGS"
                || k == "DEBUG"
                || k == "OPT_LEVEL"
                || k == "PROFILE"
                || k == "TARGET"
                || k == "HOST")
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the guest kernel: {e}"));
    if !status.success() {
        panic!(
            "building the guest kernel in {} failed ({status}); see the errors above",
            guest.display()
        );
    }

    for name in ["kernel", "user"] {
        let built = target_dir.join(GUEST_TARGET).join("release").join(name);
        let dst = out.join(format!("guest-{name}.elf"));
        std::fs::copy(&built, &dst)
            .unwrap_or_else(|e| panic!("guest build produced no {}: {e}", built.display()));
    }
}

/// Installs the guest target with rustup if the sysroot does not have it.
fn ensure_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let installed = |s: &Path| s.join("lib/rustlib").join(GUEST_TARGET).join("lib").is_dir();
    if sysroot.as_deref().is_some_and(installed) {
        return;
    }
    println!("cargo:warning=installing the {GUEST_TARGET} target with rustup (needed for the guest kernel)");
    let ok = Command::new("rustup")
        .args(["target", "add", GUEST_TARGET])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        panic!(
            "the {GUEST_TARGET} target is not installed and `rustup target add {GUEST_TARGET}` failed; \
             install it by hand and build again"
        );
    }
}
