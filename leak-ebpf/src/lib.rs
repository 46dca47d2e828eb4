//! Empty on purpose: the programs live in the `leaktrace` binary target (`main.rs`).
//! This library target exists so that `leak-user` can name this crate as a
//! build-dependency, which makes cargo rebuild the daemon when the programs change.
#![no_std]
