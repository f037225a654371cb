//! The user-facing subcommands, one folder per server with its async-layer (`--rt`) variant
//! beside it: `echo/`, `proxy/`, `fanout/` (each `mod.rs` the event loop and the flags, `rt.rs`
//! the same server on `ringpool::rt`), and `probe`. `bench` is its own tree (`crate::bench`).

pub mod echo;
pub mod fanout;
pub mod probe;
pub mod proxy;
