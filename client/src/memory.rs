//! Tensor memory that a call borrows from its caller: gradients a push
//! reads and parameters a pull writes, reached by the network tasks without
//! a copy of their own.
//!
//! A gRPC request body is encoded by a task of the connection, which can
//! still run after the call that made it has returned (a server that
//! answers before it has read the whole body). So memory is never handed to
//! the network as a slice whose lifetime Rust could check: it is lent under
//! a [`Lease`], and every read or write goes through the lease, which holds
//! a read lock while it touches the memory. Ending the lease takes the write
//! lock, so it waits for an access under way, and no access starts after it.
//! A call ends its lease before it returns (on every path: [`LeaseGuard`]
//! ends it when dropped), which is what makes lending sound.
//!
//! This module is the only place of the client with `unsafe` code.
#![allow(unsafe_code)]

use std::sync::{Arc, RwLock};

// Tensors travel as little-endian f32 bytes: memory is lent as it is, so
// the host must be little-endian.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "paramd's client lends tensor memory as wire bytes: little-endian only"
);

/// Whether lent memory may still be touched.
#[derive(Debug)]
pub struct Lease {
    live: RwLock<bool>,
}

/// Ends its lease when dropped.
#[derive(Debug)]
pub struct LeaseGuard(Arc<Lease>);

impl LeaseGuard {
    /// A new lease, live until the guard is dropped.
    pub fn new() -> LeaseGuard {
        LeaseGuard(Arc::new(Lease {
            live: RwLock::new(true),
        }))
    }

    /// The lease, for the memory lent under it.
    pub fn lease(&self) -> Arc<Lease> {
        Arc::clone(&self.0)
    }
}

impl Default for LeaseGuard {
    fn default() -> Self {
        LeaseGuard::new()
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        // Waits for an access under way; none starts after this.
        *self.0.live.write().unwrap_or_else(|e| e.into_inner()) = false;
    }
}

impl Lease {
    /// Runs `f` while the lease is live (holding it live meanwhile); None
    /// once it has ended.
    fn with<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        live.then(f)
    }
}

/// Read-only memory of one tensor, in wire bytes.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a Source is only dereferenced through `Lent::read`, under a live
// lease, during which the lender keeps the memory valid and unmoved.
unsafe impl Send for Source {}
unsafe impl Sync for Source {}

impl Source {
    /// The memory of `values`.
    ///
    /// # Safety
    ///
    /// `values` must stay valid, unmoved and unwritten until every lease
    /// this source is lent under has ended.
    pub unsafe fn new(values: &[f32]) -> Source {
        Source {
            ptr: values.as_ptr().cast(),
            len: std::mem::size_of_val(values),
        }
    }

    /// `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// As for [`Source::new`]: `len` bytes readable at `ptr` until every
    /// lease the source is lent under has ended.
    pub unsafe fn from_raw(ptr: *const u8, len: usize) -> Source {
        Source { ptr, len }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Writable memory of one tensor, in wire bytes.
#[derive(Debug, Clone, Copy)]
pub struct Dest {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a Dest is only dereferenced through `Lent::write`, under a live
// lease; callers write disjoint ranges (see `Lent::write`).
unsafe impl Send for Dest {}
unsafe impl Sync for Dest {}

impl Dest {
    /// The memory of `values`.
    ///
    /// # Safety
    ///
    /// `values` must stay valid and unmoved, and be neither read nor written
    /// by anyone else, until every lease this destination is lent under
    /// has ended.
    pub unsafe fn new(values: &mut [f32]) -> Dest {
        Dest {
            ptr: values.as_mut_ptr().cast(),
            len: std::mem::size_of_val(values),
        }
    }

    /// `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// As for [`Dest::new`].
    pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> Dest {
        Dest { ptr, len }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Memory lent under a lease.
#[derive(Debug, Clone)]
pub struct Lent<M> {
    pub memory: M,
    lease: Arc<Lease>,
}

impl<M> Lent<M> {
    /// `memory`, lent under `lease`.
    pub fn new(memory: M, lease: Arc<Lease>) -> Lent<M> {
        Lent { memory, lease }
    }
}

impl Lent<Source> {
    /// Runs `f` on bytes `start..start + len` while the lease is live;
    /// None after it has ended, or for a range past the end.
    pub fn read<R>(&self, start: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let end = start.checked_add(len)?;
        if end > self.memory.len {
            return None;
        }
        self.lease.with(|| {
            // SAFETY: in bounds (checked above), and the lease is live: the
            // lender keeps the memory valid until it ends (Source::new).
            let bytes = unsafe { std::slice::from_raw_parts(self.memory.ptr.add(start), len) };
            f(bytes)
        })
    }
}

impl Lent<Dest> {
    /// Copies `bytes` to offset `start` while the lease is live. False
    /// after it has ended, or for a range past the end (nothing written).
    ///
    /// Concurrent writers must write disjoint ranges: the pull checks that
    /// every shard writes only the chunks the layout gives it.
    pub fn write(&self, start: usize, bytes: &[u8]) -> bool {
        let Some(end) = start.checked_add(bytes.len()) else {
            return false;
        };
        if end > self.memory.len {
            return false;
        }
        self.lease
            .with(|| {
                // SAFETY: in bounds (checked above); the lease is live, so
                // the lender keeps the memory valid and to ourselves
                // (Dest::new); concurrent writers write disjoint ranges.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        self.memory.ptr.add(start),
                        bytes.len(),
                    )
                }
            })
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_reachable_only_while_the_lease_lives() {
        let values = [1.0f32, 2.0, 3.0];
        let mut out = [0f32; 3];
        let guard = LeaseGuard::new();
        // SAFETY: both outlive the guard, dropped below.
        let src = Lent::new(unsafe { Source::new(&values) }, guard.lease());
        let dst = Lent::new(unsafe { Dest::new(&mut out) }, guard.lease());
        let copied = src.read(4, 8, |b| dst.write(4, b));
        assert_eq!(copied, Some(true));
        assert_eq!(src.read(8, 8, |_| ()), None, "past the end");
        assert!(!dst.write(8, &[0; 8]), "past the end");
        drop(guard);
        assert_eq!(src.read(0, 4, |_| ()), None, "after the lease ended");
        assert!(!dst.write(0, &[0; 4]), "after the lease ended");
        assert_eq!(out, [0.0, 2.0, 3.0]);
    }
}
