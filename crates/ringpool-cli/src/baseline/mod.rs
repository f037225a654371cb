//! The baseline servers `ringpool bench` measures ringpool against (hidden subcommands): a
//! tokio echo server and proxy, a blocking std proxy, and a `sendfile(2)` file server.

pub mod sendfile_server;
pub mod std_proxy;
pub mod tokio_echo;
pub mod tokio_proxy;
