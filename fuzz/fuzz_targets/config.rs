//! The configuration file of `vmm run --config FILE` (`ConfigFile::parse`,
//! then `into_config`, which checks the bundled kernel's command line with
//! the guest's own parser), and the boot information a valid configuration
//! gives the guest (`loader::boot_info`: it must build and validate, with
//! the command line intact). The whole input also goes to the flag parsers
//! `parse_size` and `MemBackend::from_str`; a backend that parses shows
//! (`Display`, in `--stats`) as a value that parses back to it. Seeds:
//! `resources/vm.toml` and the README's examples.
#![no_main]

use abi::boot::Module;
use abi::layout::MODULE_START;
use libfuzzer_sys::fuzz_target;
use vmm::config_file::ConfigFile;
use vmm_core::config::{parse_size, KernelSource};
use vmm_core::loader::boot_info;
use vmm_core::MemBackend;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = parse_size(text) {
        assert_eq!(parse_size(&n.to_string()), Ok(n));
    }
    if let Ok(b) = text.parse::<MemBackend>() {
        let shown = b.to_string();
        assert_eq!(
            shown.parse::<MemBackend>().as_ref(),
            Ok(&b),
            "`{text}` shows as `{shown}`"
        );
    }
    let Ok(file) = ConfigFile::parse(text, "fuzz.toml") else {
        return;
    };
    let Ok(cfg) = ConfigFile::defaults().overridden_by(file).into_config() else {
        return;
    };
    let module = Module {
        start: MODULE_START,
        len: 4096,
    };
    let info = match boot_info(cfg.mem_size, cfg.vcpus, &cfg.cmdline, module) {
        Ok(info) => info,
        Err(e) => panic!("a valid configuration gives no boot information: {e}: {cfg:?}"),
    };
    assert_eq!(info.validate(), Ok(()), "{cfg:?}");
    assert_eq!(info.cmdline().ok(), Some(cfg.cmdline.as_str()));
    if cfg.kernel == KernelSource::Bundled {
        // What the host accepted, the guest parses from the boot information.
        assert!(abi::workload::parse_cmdline(info.cmdline().unwrap_or_default()).is_ok());
    }
});
