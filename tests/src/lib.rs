//! A mock vhost-user frontend for socket-level tests and benchmarks of the daemons.
//!
//! It plays the part of QEMU or the VMM over a real Unix socket, with
//! [`vhost::vhost_user::Frontend`]: guest memory in a memfd shared through SET_MEM_TABLE,
//! split virtqueues with kick and call eventfds, descriptor chains written into guest memory
//! by hand (so tests can also write broken ones), used-ring completion and config reads.
//!
//! ```no_run
//! use vhost_user_test::{binary, Daemon, Desc, Options, Session};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let socket = dir.path().join("sock");
//! let _daemon = Daemon::start(&binary("vhost-user-block"), &["--path", "disk.img", "--socket"], &socket);
//! let mut s = Session::connect(&socket, &Options::default()).unwrap();
//! let buf = s.guest.alloc(512);
//! let head = s.add(0, &[Desc::writable(buf, 512)]);
//! let used = s.wait(0, 1);
//! assert_eq!(used[0].id, head);
//! ```
//!
//! Device-specific request builders live in their own modules ([`blk`]).

pub mod blk;
mod daemon;
mod error;
mod frontend;
mod guest;
pub mod net;
mod queue;

pub use daemon::{binary, cpu_time, Daemon};
pub use error::{Error, Result};
pub use frontend::{Completion, Options, Session, F_EVENT_IDX, F_PROTOCOL_FEATURES, F_VERSION_1};
pub use guest::GuestMemory;
pub use queue::{write_table, Desc, SplitQueue, Used, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
