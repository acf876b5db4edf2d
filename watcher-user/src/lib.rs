//! `watcher`: keeps replicas of large directory trees in step with the source, live.
//!
//! Data flows one way:
//!
//! ```text
//! backend (fanotify) -> Event -> filter (which group, excluded?) -> dirty set per target
//!   -> flush policy (when) -> rsync executor (how) -> target
//! ```
//!
//! `filter`, `dirty` and `flush` are pure: they take paths, events and a clock and return
//! decisions, and are unit-tested with tables of cases.

pub mod backend;
pub mod backlog;
pub mod caps;
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dirty;
pub mod docs;
pub mod event;
pub mod failing;
pub mod filter;
pub mod flush;
pub mod hardlinks;
pub mod journal;
pub mod link_walk;
pub mod logging;
pub mod notify;
pub mod post_sync;
pub mod replay;
pub mod resolve;
pub mod rsync;
pub mod runner;
pub mod ssh;
pub mod status;
pub mod sync_machine;
pub mod target;
pub mod watch;
pub mod words;
