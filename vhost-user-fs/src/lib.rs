//! vhost-user-fs: a virtio-fs device daemon sharing one host directory with a guest.
//!
//! Layers, each in one place: [`fuse`] (the FUSE wire protocol), [`passthrough`] (the
//! filesystem operations on the host directory, confined to it), [`server`] (one FUSE request
//! in, one reply out), [`backend`] (the vhost-user queues and guest memory), [`seccomp`] (the
//! system-call allow-list). The process sandbox (mount namespace / chroot) is in
//! `common::sandbox`.

pub mod backend;
pub mod fuse;
pub mod passthrough;
pub mod seccomp;
pub mod server;
mod sys;

pub use backend::FsBackend;
pub use passthrough::{CachePolicy, FsConfig, IdMap, IdRange, PassthroughFs};
pub use server::Server;

#[cfg(test)]
mod tests;
