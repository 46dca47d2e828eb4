//! Allocation wrappers and how to see through them.
//!
//! C++'s operator new calls malloc; so do strdup and friends. When the allocator
//! fires, the return address on top of the stack points into the wrapper, not into
//! the user's code, and a frame-pointer walk does not help (these libraries are
//! built without frame pointers). But a wrapper's frame is simple: between its
//! entry and each call it makes, it pushes a fixed number of bytes. So for every
//! call site in a wrapper we compute, by disassembly, how far above that call's
//! return-address slot the wrapper's own return address sits; the eBPF program
//! follows these hints (a few wrappers deep: nothrow new calls new calls malloc).
//!
//! (We do not hook operator new itself in libstdc++: a uretprobe replaces return
//! addresses on the stack, and C++ exception unwinding through such a frame ends in
//! std::terminate — a throwing `new` would kill the target.)

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, OpKind, Register};

use super::elf::ElfFile;

/// Wrappers whose callers we want to see.
pub const WRAPPERS: &[&str] = &[
    "_Znwm",
    "_Znam",
    "_ZnwmRKSt9nothrow_t",
    "_ZnamRKSt9nothrow_t",
    "_ZnwmSt11align_val_t",
    "_ZnamSt11align_val_t",
    "_ZnwmSt11align_val_tRKSt9nothrow_t",
    "_ZnamSt11align_val_tRKSt9nothrow_t",
    "strdup",
    "__strdup",
    "strndup",
    "__strndup",
    "wcsdup",
];

/// Most bytes of a wrapper we decode.
const MAX_WRAPPER_BYTES: usize = 512;

/// A call site inside a wrapper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hint {
    /// File offset of the call's return address.
    pub ret_file_offset: u64,
    /// Bytes from the return address's stack slot up to the wrapper's own return
    /// address.
    pub offset: u32,
}

fn rsp_immediate(insn: &Instruction) -> Option<i64> {
    (insn.op0_kind() == OpKind::Register && insn.op0_register() == Register::RSP)
        .then(|| insn.immediate(1) as i64)
}

/// The stack depth (bytes below the entry's return-address slot) at every call of
/// the straight-line code starting at `vaddr`, up to its first ret or jmp.
pub fn call_sites(code: &[u8], vaddr: u64) -> Vec<(u64, u32)> {
    let mut decoder = Decoder::with_ip(64, code, vaddr, DecoderOptions::NONE);
    let mut depth: i64 = 0;
    let mut out = Vec::new();
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            break;
        }
        match insn.code() {
            Code::Push_r64 | Code::Pushq_imm8 | Code::Pushq_imm32 => depth += 8,
            Code::Pop_r64 => depth -= 8,
            Code::Sub_rm64_imm8 | Code::Sub_rm64_imm32 => {
                if let Some(n) = rsp_immediate(&insn) {
                    depth += n;
                }
            }
            Code::Add_rm64_imm8 | Code::Add_rm64_imm32 => {
                if let Some(n) = rsp_immediate(&insn) {
                    depth -= n;
                }
            }
            _ => {
                if insn.op0_kind() == OpKind::Register && insn.op0_register() == Register::RSP {
                    break; // some other way of moving the stack: stop guessing
                }
            }
        }
        match insn.flow_control() {
            FlowControl::Call | FlowControl::IndirectCall if depth >= 0 => {
                out.push((insn.next_ip(), (depth + 8) as u32));
            }
            FlowControl::Return
            | FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch => break,
            _ => {}
        }
    }
    out
}

/// Hints for every wrapper `elf` defines.
pub fn hints_for(elf: &ElfFile) -> Vec<Hint> {
    let mut hints = Vec::new();
    for name in WRAPPERS {
        let Some(sym) = elf.symbol(name) else {
            continue;
        };
        let len = (sym.size as usize).clamp(16, MAX_WRAPPER_BYTES);
        let Some(code) = elf.code(sym.vaddr, len) else {
            continue;
        };
        // operator new and new[] are flagged: their blocks are C++ objects.
        let flag = if name.starts_with("_Zn") {
            leak_common::HINT_OPERATOR_NEW
        } else {
            0
        };
        for (ret, offset) in call_sites(code, sym.vaddr) {
            if let Some(file_offset) = elf.file_offset(ret) {
                hints.push(Hint {
                    ret_file_offset: file_offset,
                    offset: offset | flag,
                });
            }
        }
    }
    hints.sort_by_key(|h| h.ret_file_offset);
    hints.dedup();
    hints
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libstdcxx_operator_new_calls_malloc_one_push_deep() {
        // endbr64; test rdi,rdi; mov eax,1; push rbx; cmovne rax,rdi; mov rbx,rax;
        // mov rdi,rbx; call malloc; test rax,rax; je; pop rbx; ret
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x85, 0xff, 0xb8, 0x01, 0, 0, 0, 0x53, 0x48, 0x0f, 0x45,
            0xc7, 0x48, 0x89, 0xc3, 0x48, 0x89, 0xdf, 0xe8, 0x64, 0x08, 0xff, 0xff, 0x48, 0x85,
            0xc0, 0x74, 0x02, 0x5b, 0xc3,
        ];
        let sites = call_sites(&code, 0xa9570);
        assert_eq!(sites, vec![(0xa958c, 16)]);
    }

    #[test]
    fn nothrow_new_calls_new_with_a_padded_frame() {
        // endbr64; sub rsp,8; call _Znwm; add rsp,8; ret
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83, 0xec, 0x08, 0xe8, 0x13, 0x03, 0xff, 0xff, 0x48,
            0x83, 0xc4, 0x08, 0xc3,
        ];
        assert_eq!(call_sites(&code, 0xa95b0), vec![(0xa95bd, 16)]);
    }

    #[test]
    fn stops_at_unknown_stack_moves() {
        // and rsp,-16; call x
        let code = [0x48, 0x83, 0xe4, 0xf0, 0xe8, 0, 0, 0, 0];
        assert!(call_sites(&code, 0x1000).is_empty());
    }
}
