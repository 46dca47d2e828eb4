//! The oldest kernel leaktrace's design can run on, checked by feature, not by
//! version number (distribution kernels backport BPF features).
//!
//! The eBPF programs write to a ring buffer (Linux 5.8) and tell the allocator
//! functions apart by the cookie of their uprobe link (`bpf_get_attach_cookie`, perf
//! links for uprobes: 5.15). A kernel without them fails at load or attach with an
//! opaque verifier message; this check names what is missing instead, in one line.

use aya::{maps::MapType, sys::is_map_supported};

/// The oldest mainline kernel with every feature leaktrace needs.
pub const OLDEST_KERNEL: &str = "5.15";

/// What the running kernel offers, of what leaktrace needs.
#[derive(Clone, Copy, Debug)]
pub struct Offered {
    pub ring_buffer: bool,
    pub perf_link: bool,
    pub attach_cookie: bool,
}

impl Offered {
    /// Probes the running kernel (a few tiny BPF loads; aya caches most).
    pub fn detect() -> Self {
        let f = aya::features();
        Self {
            ring_buffer: matches!(is_map_supported(MapType::RingBuf), Ok(true)),
            perf_link: f.bpf_perf_link(),
            attach_cookie: f.bpf_cookie(),
        }
    }

    /// The missing features, named for the one-line refusal.
    pub fn missing(self) -> Vec<&'static str> {
        [
            (self.ring_buffer, "BPF ring buffers (5.8)"),
            (self.perf_link, "BPF links for uprobes (5.15)"),
            (
                self.attach_cookie,
                "bpf_get_attach_cookie for uprobes (5.15)",
            ),
        ]
        .into_iter()
        .filter(|(present, _)| !present)
        .map(|(_, name)| name)
        .collect()
    }
}

/// The kernel's release (`uname -r`), for messages.
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_features_are_named_with_their_kernel() {
        let all = Offered {
            ring_buffer: true,
            perf_link: true,
            attach_cookie: true,
        };
        assert!(all.missing().is_empty());
        let old = Offered {
            attach_cookie: false,
            perf_link: false,
            ..all
        };
        assert_eq!(
            old.missing(),
            [
                "BPF links for uprobes (5.15)",
                "bpf_get_attach_cookie for uprobes (5.15)"
            ]
        );
    }

    #[test]
    fn this_kernel_has_everything() {
        // The machines the tests run on (6.1 and later) are above the floor; this
        // needs root to load probe programs, so only check what it says when it can.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(Offered::detect().missing().is_empty(), "{}", release());
        }
    }
}
