//! Synchronisation primitives that only need `lock cmpxchg`/`xchg`, which KVM's
//! emulator executes at CPL0 (no `pause`: spinning is rare and short).

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// A test-and-set spinlock. Interrupts are always off in this kernel, so a
/// holder cannot be interrupted by code taking the same lock on its CPU.
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock gives exclusive access to `value`, so sharing the lock between
// CPUs is sound whenever `T` may be sent between them.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// An unlocked lock.
    pub const fn new(value: T) -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Spins until the lock is free, then holds it until the guard drops.
    // No spin_loop hint: `pause` is not on the list of instructions known to
    // work in KVM's CPL0 emulator here.
    #[allow(clippy::missing_spin_loop)]
    pub fn lock(&self) -> SpinGuard<'_, T> {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.locked.load(Ordering::Relaxed) {}
        }
        SpinGuard { lock: self }
    }
}

/// Holds a [`SpinLock`].
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while the lock is held.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard exists only while the lock is held, and is unique.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// A value written once (by the boot CPU) and read by every CPU afterwards.
pub struct SetOnce<T> {
    state: AtomicU8,
    value: UnsafeCell<Option<T>>,
}

// SAFETY: the value is written once, before `state` becomes READY (Release), and
// only read after observing READY (Acquire); it is never mutated afterwards.
unsafe impl<T: Send + Sync> Sync for SetOnce<T> {}

const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;

impl<T> SetOnce<T> {
    /// Empty.
    pub const fn new() -> Self {
        SetOnce {
            state: AtomicU8::new(EMPTY),
            value: UnsafeCell::new(None),
        }
    }

    /// Stores the value; returns it back if one was already stored.
    pub fn set(&self, value: T) -> Result<(), T> {
        if self
            .state
            .compare_exchange(EMPTY, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(value);
        }
        // SAFETY: the EMPTY -> WRITING transition makes this the only writer, and
        // no reader looks at the value before READY.
        unsafe { *self.value.get() = Some(value) };
        self.state.store(READY, Ordering::Release);
        Ok(())
    }

    /// The value, once stored.
    pub fn get(&self) -> Option<&T> {
        if self.state.load(Ordering::Acquire) != READY {
            return None;
        }
        // SAFETY: READY means the write finished and no further write happens.
        unsafe { (*self.value.get()).as_ref() }
    }
}
