//! The persistence seam of the VMM: every stateful component (a vCPU, the
//! irqchip, a device, the memory manager, the controller) saves and restores
//! itself through [`Persist`], and a VM's state is the composition of theirs.
//! A new component then cannot be forgotten by snapshots or migration: it has
//! no state until it implements this trait, and the state type it names is
//! part of the composed one.
//!
//! The shape follows Firecracker's `snapshot/persist.rs`. Capturing state is
//! separate from saving guest memory (memory is not part of any `State`), so a
//! caller may capture states in a short pause and write memory later.
//!
//! Versioning lives in the formats that carry states (the snapshot manifest,
//! the migration stream header), not here: see `docs/snapshot.md`.

/// A component that can save its state and be rebuilt from it.
pub trait Persist: Sized {
    /// The saved state. Serde, so that the snapshot format and the migration
    /// stream can carry it; it holds no host resources (fds, pointers).
    type State: serde::Serialize + serde::de::DeserializeOwned;
    /// What a restore needs besides the state: the host resources of the new
    /// instance (file descriptors, guest memory, event sinks).
    type ConstructorArgs;
    /// Why a save or a restore failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Captures the component's state. Callers make sure the component is
    /// quiescent (vCPUs paused, devices paused) so the state is consistent.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Builds the component from `args` and a state saved by [`Persist::save`]
    /// (possibly by another process, or on another host).
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
