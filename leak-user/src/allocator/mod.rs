//! Where the allocator really lives in a target, and where exactly to hook it.
//!
//! * [`elf`]: symbols, code and file offsets of one ELF object.
//! * [`discover`]: which objects of a process (or of a command about to run)
//!   provide the malloc family or C++'s operator new, and which functions to hook.
//! * [`placement`]: the probe site inside each function (emulated, not single-stepped).
//! * [`resolve`], [`ldcache`]: the loader's view, to predict a command's libraries.
//! * [`wrappers`]: seeing through operator new and strdup to the user's call site.
//! * [`glibc_heap`]: the live blocks of a glibc heap, read from outside (late attach).

pub mod discover;
pub mod elf;
pub mod glibc_heap;
pub mod ldcache;
pub mod placement;
pub mod resolve;
pub mod wrappers;

pub use self::discover::{HookPlan, HookedFunction, HookedObject, WrapperObject};
