//! The bundled guest kernel must not contain instructions that this project's KVM
//! (PVM) refuses to emulate at CPL0 (see docs/platform.md and
//! docs/guest-kernel.md). Disassembles the embedded kernel with objdump.
#![allow(clippy::unwrap_used)]

use std::process::Command;

const REFUSED: &[&str] = &[
    "popcnt",
    "lzcnt",
    "tzcnt",
    "xsave",
    "xsaveopt",
    "xrstor",
    "xgetbv",
    "cmpxchg16b",
    "andn",
    "mulx",
    "stac",
    "clac",
    "crc32",
    "rdtscp",
    "movbe",
    "rdpid",
    "lsl",
    "lar",
    "verr",
    "verw",
    "rdpkru",
];

#[test]
fn kernel_has_no_instruction_the_emulator_refuses() {
    let path = std::env::temp_dir().join(format!("vmm-kernel-disasm-{}", std::process::id()));
    std::fs::write(&path, vmm::guest::KERNEL).unwrap();
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "intel"])
        .arg(&path)
        .output()
        .expect("objdump (binutils) is needed to check the guest kernel; install binutils");
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "objdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut bad = Vec::new();
    let mut count = 0;
    for line in text.lines() {
        // "  100abc:\tmnemonic operands"
        let Some((_, insn)) = line.split_once(":\t") else {
            continue;
        };
        count += 1;
        let mnemonic = insn.split_whitespace().next().unwrap_or("");
        let vector = insn.contains("xmm") || insn.contains("ymm") || insn.contains("zmm");
        let x87 =
            mnemonic.starts_with('f') && !mnemonic.starts_with("fxsave") && !mnemonic.starts_with("fxrstor");
        if REFUSED.contains(&mnemonic) || vector || x87 {
            bad.push(line.to_string());
        }
    }
    assert!(count > 1000, "disassembly looks empty ({count} instructions)");
    assert!(
        bad.is_empty(),
        "refused instructions in the guest kernel:\n{}",
        bad.join("\n")
    );
}

#[test]
fn kernel_has_no_breakpoint_in_code_paths() {
    // int3 at CPL0 is refused; the only 0xcc bytes allowed are inter-function padding,
    // which objdump shows as int3 runs after a ret/jmp (or a call of a function that
    // does not return). Check that each int3 follows such an instruction.
    let path = std::env::temp_dir().join(format!("vmm-kernel-int3-{}", std::process::id()));
    std::fs::write(&path, vmm::guest::KERNEL).unwrap();
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut prev = String::new();
    for line in text.lines() {
        let Some((_, insn)) = line.split_once(":\t") else {
            continue;
        };
        let m = insn.split_whitespace().next().unwrap_or("").to_string();
        if m == "int3" {
            assert!(
                ["int3", "ret", "jmp", "call", "ud2", "hlt", "iretq"].contains(&prev.as_str())
                    || prev.is_empty(),
                "int3 reachable after `{prev}`: {line}"
            );
        }
        prev = m;
    }
}
