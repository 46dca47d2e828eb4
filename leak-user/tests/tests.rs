//! Integration tests: the real daemon, real eBPF programs, fixture programs with a
//! known truth. They need root; run them with `sudo -E cargo xtask test`.

mod before_attach;
mod ci;
mod cli;
mod daemon;
mod debuginfo;
mod deleted;
mod formats;
mod kernel;
mod live;
mod metrics;
mod output;
mod profiles;
mod reports;
mod scanning;
mod schema;
mod service;
mod shutdown;
mod survival;
mod targets;
mod tracking;
mod unwind;
mod util;
