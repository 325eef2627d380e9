//! Typed VM configuration: the one door through which the CLI, a config file and
//! the tests describe a VM (`resources/vm.toml` holds the defaults).

use abi::boot::{CMDLINE_MAX, MAX_VCPUS};
use abi::layout::{MAX_MEM_SIZE, MIN_MEM_SIZE, PAGE_SIZE};
use serde::Deserialize;
use std::path::PathBuf;

/// The defaults, `resources/vm.toml`, compiled in.
pub const DEFAULT_CONFIG: &str = include_str!("../../resources/vm.toml");

/// Errors in a VM configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size string that does not parse.
    #[error("invalid memory size `{0}`: use a number of bytes with an optional K, M or G suffix, e.g. 512M")]
    BadSize(String),
    /// Zero memory.
    #[error("memory size must not be zero; use at least {} MiB", MIN_MEM_SIZE >> 20)]
    ZeroMemory,
    /// Memory below the minimum.
    #[error("memory size {0} bytes is too small: the guest needs at least {min} MiB", min = MIN_MEM_SIZE >> 20)]
    MemoryTooSmall(u64),
    /// Memory above the maximum.
    #[error("memory size {0} bytes is too large: at most {max} GiB is supported", max = MAX_MEM_SIZE >> 30)]
    MemoryTooLarge(u64),
    /// Memory not a multiple of the page size.
    #[error("memory size {0} bytes is not a multiple of the 4 KiB page size")]
    MemoryNotAligned(u64),
    /// vCPU count out of range.
    #[error("vCPU count {0} is out of range: use 1 to {MAX_VCPUS}")]
    BadVcpuCount(u32),
    /// Command line too long.
    #[error("command line is {0} bytes; at most {CMDLINE_MAX} fit in the boot information")]
    CmdlineTooLong(usize),
    /// The bundled kernel would reject the command line.
    #[error("the bundled guest kernel rejects the command line: {0}")]
    BadCmdline(String),
    /// A config file that cannot be read or parsed.
    #[error("cannot use config file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Which guest kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KernelSource {
    /// The guest kernel built from `guest-kernel/` and embedded in the binary.
    #[default]
    Bundled,
    /// An x86_64 ELF kernel file.
    File(PathBuf),
}

/// A validated VM configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The kernel.
    pub kernel: KernelSource,
    /// vCPU count, 1 ..= [`MAX_VCPUS`].
    pub vcpus: u32,
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// Kernel command line.
    pub cmdline: String,
}

/// A configuration as written in a file: every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Path of a kernel ELF.
    pub kernel: Option<PathBuf>,
    /// vCPU count.
    pub vcpus: Option<u32>,
    /// Memory size (`"256M"`).
    pub mem: Option<String>,
    /// Command line.
    pub cmdline: Option<String>,
}

impl ConfigFile {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::File { path: origin.into(), reason: e.to_string() })
    }

    /// Reads a TOML file.
    pub fn load(path: &std::path::Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::File { path: path.display().to_string(), reason: e.to_string() })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// `other`'s fields where set, else ours.
    pub fn overridden_by(self, other: ConfigFile) -> ConfigFile {
        ConfigFile {
            kernel: other.kernel.or(self.kernel),
            vcpus: other.vcpus.or(self.vcpus),
            mem: other.mem.or(self.mem),
            cmdline: other.cmdline.or(self.cmdline),
        }
    }

    /// The built-in defaults.
    pub fn defaults() -> ConfigFile {
        // The file is compiled in and covered by a unit test.
        Self::parse(DEFAULT_CONFIG, "resources/vm.toml").unwrap_or_default()
    }
}

impl TryFrom<ConfigFile> for VmConfig {
    type Error = ConfigError;

    fn try_from(f: ConfigFile) -> Result<Self, ConfigError> {
        let kernel = f.kernel.map_or(KernelSource::Bundled, KernelSource::File);
        let vcpus = f.vcpus.unwrap_or(1);
        let mem_size = parse_size(f.mem.as_deref().unwrap_or("256M"))?;
        let cmdline = f.cmdline.unwrap_or_default();
        let cfg = VmConfig { kernel, vcpus, mem_size, cmdline };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl VmConfig {
    /// The defaults of `resources/vm.toml`.
    pub fn bundled_default() -> Result<VmConfig, ConfigError> {
        VmConfig::try_from(ConfigFile::defaults())
    }

    /// Checks every field; the bundled kernel's command line is checked with the
    /// guest's own parser so a typo fails here, not in the guest.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::BadVcpuCount(self.vcpus));
        }
        match self.mem_size {
            0 => return Err(ConfigError::ZeroMemory),
            m if m % PAGE_SIZE != 0 => return Err(ConfigError::MemoryNotAligned(m)),
            m if m < MIN_MEM_SIZE => return Err(ConfigError::MemoryTooSmall(m)),
            m if m > MAX_MEM_SIZE => return Err(ConfigError::MemoryTooLarge(m)),
            _ => {}
        }
        if self.cmdline.len() > CMDLINE_MAX {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if self.kernel == KernelSource::Bundled {
            abi::workload::parse_cmdline(&self.cmdline).map_err(|e| ConfigError::BadCmdline(e.to_string()))?;
        }
        Ok(())
    }
}

/// Parses `4096`, `64K`, `256M`, `4G` (binary multiples, optional `B`/`iB`).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_is_valid() {
        let c = VmConfig::bundled_default().unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.mem_size, 256 << 20);
        assert_eq!(c.kernel, KernelSource::Bundled);
        assert!(c.cmdline.contains("workload="));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn bad_values_have_clear_messages() {
        let mut c = VmConfig::bundled_default().unwrap();
        c.mem_size = 0;
        assert_eq!(c.validate().unwrap_err().to_string(), "memory size must not be zero; use at least 64 MiB");
        c.mem_size = (256 << 20) + 1;
        assert!(matches!(c.validate(), Err(ConfigError::MemoryNotAligned(_))));
        c.mem_size = 128 << 30;
        assert!(matches!(c.validate(), Err(ConfigError::MemoryTooLarge(_))));
        c.mem_size = 256 << 20;
        c.vcpus = 9;
        assert_eq!(c.validate().unwrap_err().to_string(), "vCPU count 9 is out of range: use 1 to 8");
        c.vcpus = 1;
        c.cmdline = "workload=dance".into();
        assert!(matches!(c.validate(), Err(ConfigError::BadCmdline(_))));
        c.kernel = KernelSource::File("/k".into());
        assert_eq!(c.validate(), Ok(()), "a custom kernel's command line is its own business");
    }

    #[test]
    fn files_override_defaults() {
        let f = ConfigFile::parse("vcpus = 2\nmem = \"1G\"", "t").unwrap();
        let c = VmConfig::try_from(ConfigFile::defaults().overridden_by(f)).unwrap();
        assert_eq!((c.vcpus, c.mem_size), (2, 1 << 30));
        assert!(ConfigFile::parse("vcpu = 2", "t").is_err(), "unknown keys are rejected");
    }
}
