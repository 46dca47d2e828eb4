//! Where exactly to put each uprobe.
//!
//! A uprobe on an instruction the kernel can emulate (push, jmp, call, jcc, nop)
//! costs about 0.7 µs a hit here; on any other instruction the kernel single-steps
//! it out of line, about 28 µs under virtualization (../design §2). So:
//!
//! * Functions with a return probe (every allocating function) must be probed at
//!   their first instruction: the uretprobe takes the return address from the top of
//!   the stack at the probe. We report whether that instruction is emulated.
//! * Free-like functions (no return probe) may be probed later, at the first
//!   emulated instruction, if every real call passes it with the pointer still in
//!   its register. Only a `test rdi,rdi; je …` pair may come before it (it skips
//!   free(NULL), which is nothing), plus instructions that change neither rdi nor
//!   memory nor control flow. Otherwise the probe stays at +0, with a warning.
//!
//! glibc 2.36's free starts `test rdi,rdi; je; push rbp`: the probe goes to free+9.

use std::fmt;

use iced_x86::{
    Code, ConditionCode, Decoder, DecoderOptions, FastFormatter, FlowControl, Instruction,
    InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
};

/// How many instructions to look at before giving up on a better site.
const MAX_PROLOGUE: usize = 12;

/// The chosen probe site of one function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// Bytes from the function's first instruction.
    pub offset: u64,
    /// The instruction at the site, e.g. `push r12`.
    pub instruction: String,
    /// Does the kernel emulate it (cheap), or single-step it (expensive)?
    pub emulated: bool,
    /// Why the probe is where it is, when that is worth saying.
    pub note: Option<&'static str>,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "+{:#x} `{}` ({})",
            self.offset,
            self.instruction,
            if self.emulated {
                "emulated"
            } else {
                "single-stepped"
            }
        )?;
        if let Some(note) = self.note {
            write!(f, "; {note}")?;
        }
        Ok(())
    }
}

/// Does the running kernel's uprobe code emulate this instruction instead of
/// single-stepping it (arch/x86/kernel/uprobes.c: branches, push, nop)?
pub fn is_emulated(insn: &Instruction) -> bool {
    match insn.flow_control() {
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call => {
            insn.op0_kind() == OpKind::NearBranch64
        }
        _ => matches!(insn.code(), Code::Push_r64) || matches!(insn.mnemonic(), Mnemonic::Nop),
    }
}

fn format(insn: &Instruction) -> String {
    let mut out = String::new();
    FastFormatter::new().format(insn, &mut out);
    out
}

fn decode(code: &[u8], vaddr: u64) -> Vec<Instruction> {
    let mut decoder = Decoder::with_ip(64, code, vaddr, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() && out.len() < MAX_PROLOGUE {
        let insn = decoder.decode();
        if insn.is_invalid() {
            break;
        }
        out.push(insn);
    }
    out
}

fn first_arg(r: Register) -> bool {
    matches!(
        r,
        Register::RDI | Register::EDI | Register::DI | Register::DIL
    )
}

/// An immediate operand (`Instruction::immediate` panics on any other kind).
fn is_immediate(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Immediate8
            | OpKind::Immediate8_2nd
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

/// `test rdi,rdi` or `cmp rdi,0`: sets ZF exactly when the pointer is NULL.
fn is_null_test(insn: &Instruction) -> bool {
    match insn.mnemonic() {
        Mnemonic::Test => {
            insn.op0_kind() == OpKind::Register
                && insn.op1_kind() == OpKind::Register
                && insn.op0_register() == Register::RDI
                && insn.op1_register() == Register::RDI
        }
        Mnemonic::Cmp => {
            insn.op0_kind() == OpKind::Register
                && insn.op0_register() == Register::RDI
                && is_immediate(insn.op1_kind())
                && insn.immediate(1) == 0
        }
        _ => false,
    }
}

/// Chooses the probe site of a function whose code starts at `vaddr`.
pub fn place(code: &[u8], vaddr: u64, has_return_probe: bool) -> Site {
    let insns = decode(code, vaddr);
    let Some(first) = insns.first() else {
        return Site {
            offset: 0,
            instruction: "?".into(),
            emulated: false,
            note: Some("code could not be decoded"),
        };
    };
    let at = |insn: &Instruction, note| Site {
        // The decoder's instruction pointer wraps at the top of the address space.
        offset: insn.ip().wrapping_sub(vaddr),
        instruction: format(insn),
        emulated: is_emulated(insn),
        note,
    };
    if has_return_probe || is_emulated(first) {
        return at(first, None);
    }
    let mut info = InstructionInfoFactory::new();
    let mut null_tested = false;
    for insn in &insns {
        if insn.flow_control() == FlowControl::ConditionalBranch {
            // Only "jump away if the pointer is NULL" may be skipped.
            if null_tested && insn.condition_code() == ConditionCode::e {
                null_tested = false;
                continue;
            }
            break;
        }
        if is_emulated(insn) {
            return at(insn, Some("after instructions that only skip free(NULL)"));
        }
        if insn.flow_control() != FlowControl::Next {
            break;
        }
        let used = info.info(insn);
        let clobbers_arg = used.used_registers().iter().any(|r| {
            first_arg(r.register()) && !matches!(r.access(), OpAccess::Read | OpAccess::CondRead)
        });
        let writes_memory = used.used_memory().iter().any(|m| {
            !matches!(
                m.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess
            )
        });
        if clobbers_arg || writes_memory {
            break;
        }
        null_tested = is_null_test(insn);
    }
    at(first, Some("no safe emulated site before it"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x1000;

    #[test]
    fn glibc_free_moves_past_the_null_check() {
        // test rdi,rdi; je +0xbf; push rbp; lea rsi,[rdi-0x10]
        let code = [
            0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55, 0x48, 0x8d, 0x77, 0xf0,
        ];
        let site = place(&code, BASE, false);
        assert_eq!(site.offset, 9);
        assert!(site.emulated);
        assert_eq!(site.instruction, "push rbp");
    }

    #[test]
    fn malloc_stays_at_its_first_instruction() {
        // push r12; push rbp
        let site = place(&[0x41, 0x54, 0x55], BASE, true);
        assert_eq!((site.offset, site.emulated), (0, true));
        assert_eq!(site.instruction, "push r12");
    }

    #[test]
    fn allocating_functions_with_a_costly_first_instruction_are_reported() {
        // cmp byte ptr [rip+0x141b46],0 (glibc's posix_memalign)
        let site = place(&[0x80, 0x3d, 0x46, 0x1b, 0x14, 0x00, 0x00], BASE, true);
        assert_eq!(site.offset, 0);
        assert!(!site.emulated);
    }

    #[test]
    fn other_branches_or_clobbers_keep_the_probe_at_entry() {
        // test rdi,rdi; jne +5; push rbp   (jne skips non-NULL calls!)
        let code = [0x48, 0x85, 0xff, 0x75, 0x05, 0x55];
        assert_eq!(place(&code, BASE, false).offset, 0);
        // mov rdi,rsi; push rbp            (pointer clobbered)
        let code = [0x48, 0x89, 0xf7, 0x55];
        assert_eq!(place(&code, BASE, false).offset, 0);
        // mov [rip+0],rdi; push rbp       (writes memory)
        let code = [0x48, 0x89, 0x3d, 0, 0, 0, 0, 0x55];
        let site = place(&code, BASE, false);
        assert_eq!((site.offset, site.emulated), (0, false));
        assert!(site.note.is_some());
    }

    #[test]
    fn compares_with_memory_are_not_null_tests() {
        // Found by the `elf` fuzz target: `cmp rdi,[mem]` was taken for
        // `cmp rdi,imm` and iced's immediate() panicked on the memory operand.
        // cmp rdi,[rdi]; je +2; push rbp
        let code = [0x48, 0x3b, 0x3f, 0x74, 0x02, 0x55];
        let site = place(&code, BASE, false);
        assert_eq!((site.offset, site.emulated), (0, false));
        // cmp rdi,0; je +2; push rbp    (still a NULL test)
        let code = [0x48, 0x83, 0xff, 0x00, 0x74, 0x02, 0x55];
        assert_eq!(place(&code, BASE, false).offset, 6);
    }

    #[test]
    fn code_at_the_top_of_the_address_space() {
        // Found by the `placement` fuzz target: the instruction pointer wrapped
        // past u64::MAX and the site's offset underflowed.
        // test rdi,rdi; je +2; push rbp, starting 2 bytes below the wrap
        let code = [0x48, 0x85, 0xff, 0x74, 0x02, 0x55];
        let site = place(&code, u64::MAX - 1, false);
        assert_eq!((site.offset, site.emulated), (5, true));
    }

    #[test]
    fn harmless_loads_may_precede_the_site() {
        // endbr64; mov rax,[rip+8]; test rdi,rdi; je +2; push rbx
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x8b, 0x05, 8, 0, 0, 0, 0x48, 0x85, 0xff, 0x74, 0x02,
            0x53,
        ];
        let site = place(&code, BASE, false);
        assert_eq!(site.offset, 16);
        assert_eq!(site.instruction, "push rbx");
    }
}
