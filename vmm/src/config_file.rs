//! The TOML configuration file of `vmm run --config FILE` and the built-in
//! defaults (`resources/vm.toml`): every field optional, flags override it,
//! and the result goes through the one typed door, [`VmConfig::validate`].
//! `seccomp` is a run-time option, not part of the VM's configuration
//! ([`ConfigFile::seccomp`]).

use sandbox::SeccompMode;
use serde::Deserialize;
use std::path::PathBuf;
use vmm_core::config::{parse_size, ConfigError, KernelSource, MemBackend, MemoryConfig, VmConfig};

/// The defaults, `resources/vm.toml`, compiled in.
pub const DEFAULT_CONFIG: &str = include_str!("../../resources/vm.toml");

/// Largest configuration file read (a guard against reading a huge wrong file).
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Errors of a configuration file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigFileError {
    /// The file cannot be read or parsed.
    #[error("cannot use config file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The values do not make a valid VM.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
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
    /// Memory backend (`"anon"`, `"zero"`, `"file:PATH,offset=N"`).
    pub mem_backend: Option<String>,
    /// Fault-around window in pages.
    pub fault_around: Option<u32>,
    /// The sandbox: `"kill"`, `"log"` or `"off"` (`docs/seccomp.md`).
    pub seccomp: Option<SeccompMode>,
}

impl ConfigFile {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<ConfigFile, ConfigFileError> {
        toml::from_str(text).map_err(|e| ConfigFileError::File {
            path: origin.into(),
            reason: e.to_string(),
        })
    }

    /// Reads a TOML file (a regular file of at most [`MAX_CONFIG_FILE`] bytes).
    pub fn load(path: &std::path::Path) -> Result<ConfigFile, ConfigFileError> {
        let err = |reason: String| ConfigFileError::File {
            path: path.display().to_string(),
            reason,
        };
        let bytes = vmm_core::files::read_regular(path, MAX_CONFIG_FILE).map_err(|e| err(e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|_| err("it is not UTF-8 text".into()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// `other`'s fields where set, else ours.
    pub fn overridden_by(self, other: ConfigFile) -> ConfigFile {
        ConfigFile {
            kernel: other.kernel.or(self.kernel),
            vcpus: other.vcpus.or(self.vcpus),
            mem: other.mem.or(self.mem),
            cmdline: other.cmdline.or(self.cmdline),
            mem_backend: other.mem_backend.or(self.mem_backend),
            fault_around: other.fault_around.or(self.fault_around),
            seccomp: other.seccomp.or(self.seccomp),
        }
    }

    /// The sandbox mode asked for, if any.
    pub fn seccomp(&self) -> Option<SeccompMode> {
        self.seccomp
    }

    /// The built-in defaults.
    pub fn defaults() -> ConfigFile {
        // The file is compiled in and covered by a unit test.
        Self::parse(DEFAULT_CONFIG, "resources/vm.toml").unwrap_or_default()
    }

    /// The memory part.
    pub fn memory(&self) -> Result<MemoryConfig, ConfigError> {
        let backend = self
            .mem_backend
            .as_deref()
            .map_or(Ok(MemBackend::Anon), str::parse)?;
        let cfg = MemoryConfig {
            backend,
            fault_around: self.fault_around,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The typed configuration.
    pub fn into_config(self) -> Result<VmConfig, ConfigError> {
        let memory = self.memory()?;
        let cfg = VmConfig {
            kernel: self.kernel.map_or(KernelSource::Bundled, KernelSource::File),
            vcpus: self.vcpus.unwrap_or(1),
            mem_size: parse_size(self.mem.as_deref().unwrap_or("256M"))?,
            cmdline: self.cmdline.unwrap_or_default(),
            memory,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The defaults of `resources/vm.toml`.
pub fn bundled_default() -> Result<VmConfig, ConfigError> {
    ConfigFile::defaults().into_config()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_is_valid() {
        let c = bundled_default().unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.mem_size, 256 << 20);
        assert_eq!(c.kernel, KernelSource::Bundled);
        assert!(c.cmdline.contains("workload="));
    }

    #[test]
    fn files_override_defaults() {
        let f = ConfigFile::parse("vcpus = 2\nmem = \"1G\"", "t").unwrap();
        let c = ConfigFile::defaults().overridden_by(f).into_config().unwrap();
        assert_eq!((c.vcpus, c.mem_size), (2, 1 << 30));
        assert!(
            ConfigFile::parse("vcpu = 2", "t").is_err(),
            "unknown keys are rejected"
        );
        let m = ConfigFile::defaults().memory().unwrap();
        assert_eq!(m, MemoryConfig::default(), "anon stays the default");
        let f = ConfigFile::parse("mem_backend = \"zero\"\nfault_around = 4", "t").unwrap();
        let m = ConfigFile::defaults().overridden_by(f).memory().unwrap();
        assert_eq!((m.backend, m.fault_around), (MemBackend::Zero, Some(4)));
        let f = ConfigFile::parse("mem_backend = \"disk\"", "t").unwrap();
        assert!(matches!(f.memory(), Err(ConfigError::BadMemBackend(_))));
    }

    #[test]
    fn the_sandbox_mode_comes_from_the_file_unless_a_flag_says_otherwise() {
        assert_eq!(
            ConfigFile::defaults().seccomp(),
            None,
            "the default is the process's"
        );
        let f = ConfigFile::parse("seccomp = \"log\"", "t").unwrap();
        assert_eq!(f.seccomp(), Some(SeccompMode::Log));
        let flags = ConfigFile {
            seccomp: Some(SeccompMode::Off),
            ..ConfigFile::default()
        };
        assert_eq!(f.clone().overridden_by(flags).seccomp(), Some(SeccompMode::Off));
        assert_eq!(
            f.overridden_by(ConfigFile::default()).seccomp(),
            Some(SeccompMode::Log)
        );
        let e = ConfigFile::parse("seccomp = \"strict\"", "t").unwrap_err();
        assert!(e.to_string().contains("kill"), "{e}");
    }
}
