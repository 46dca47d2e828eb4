//! A module's call frame information turned into the eBPF unwinder's compact table.
//!
//! `.eh_frame` (and `.debug_frame` when present) describe, for every instruction,
//! how to find the caller's frame. The eBPF side can afford one binary search and a
//! few reads per frame, not a CFI interpreter, so the rules are evaluated here, once
//! per file, into sorted [`UnwindRow`]s: CFA = rsp or rbp plus an offset, return
//! address at CFA - 8, caller's rbp saved at a CFA offset or unchanged. Anything else
//! (DWARF expressions such as the PLT's, other registers, gaps between functions)
//! becomes a `cfa::UNKNOWN` row, where the walk stops rather than guesses; an
//! undefined return address (`_start`, a thread's first frame) is `cfa::END`.
//! Pure: bytes in, rows out.

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, LittleEndian, Register, RegisterRule,
    UnwindContext, UnwindSection, X86_64,
};
use leak_common::{UnwindRow, cfa};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

/// Why a file has no table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CfiError {
    /// Not an ELF file we can read.
    #[error("not a readable ELF file: {0}")]
    NotElf(String),
    /// Neither `.eh_frame` nor `.debug_frame`.
    #[error("no .eh_frame or .debug_frame")]
    NoCfi,
    /// Code above 4 GiB of the module's own addresses (rows hold 32-bit pcs).
    #[error("code addresses above 4 GiB")]
    TooLarge,
    /// The CFI could not be parsed.
    #[error("bad CFI: {0}")]
    Bad(String),
}

/// One loadable segment: file bytes `[offset, offset + size)` are mapped at ELF
/// virtual address `vaddr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub size: u64,
    pub vaddr: u64,
}

/// What the daemon keeps of a parsed module.
#[derive(Debug)]
pub struct ModuleCfi {
    pub rows: Vec<UnwindRow>,
    pub segments: Vec<Segment>,
    pub build_id: Option<Vec<u8>>,
}

impl ModuleCfi {
    /// The load bias of a mapping that maps file offset `offset` at `start`:
    /// runtime address - ELF virtual address.
    pub fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        let seg = self
            .segments
            .iter()
            .find(|s| s.offset <= offset && offset < s.offset + s.size.max(1))?;
        let vaddr = seg.vaddr + (offset - seg.offset);
        Some(start.wrapping_sub(vaddr))
    }
}

/// Parses an ELF file's CFI into sorted rows.
pub fn parse(data: &[u8]) -> Result<ModuleCfi, CfiError> {
    let file = object::File::parse(data).map_err(|e| CfiError::NotElf(e.to_string()))?;
    let segments = file
        .segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            Segment {
                offset,
                size,
                vaddr: s.address(),
            }
        })
        .collect();
    let build_id = file.build_id().ok().flatten().map(<[u8]>::to_vec);
    let section = |name: &str| {
        file.section_by_name(name)
            .and_then(|s| Some((s.address(), s.data().ok()?)))
    };
    let mut bases = BaseAddresses::default();
    if let Some((addr, _)) = section(".text") {
        bases = bases.set_text(addr);
    }
    if let Some((addr, _)) = section(".got") {
        bases = bases.set_got(addr);
    }
    if let Some((addr, _)) = section(".eh_frame_hdr") {
        bases = bases.set_eh_frame_hdr(addr);
    }
    let mut fdes = Vec::new();
    let eh = section(".eh_frame").filter(|(_, d)| !d.is_empty());
    if let Some((addr, data)) = eh {
        let bases = bases.clone().set_eh_frame(addr);
        collect(&EhFrame::new(data, LittleEndian), &bases, &mut fdes)?;
    }
    let debug = section(".debug_frame").filter(|(_, d)| !d.is_empty());
    if let Some((_, data)) = debug {
        let mut frame = DebugFrame::new(data, LittleEndian);
        frame.set_address_size(8);
        collect(&frame, &bases, &mut fdes)?;
    }
    if eh.is_none() && debug.is_none() {
        return Err(CfiError::NoCfi);
    }
    Ok(ModuleCfi {
        rows: merge(fdes)?,
        segments,
        build_id,
    })
}

/// One function's rows: `[start, end)` and (pc, rule) from `start` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fde {
    pub start: u64,
    pub end: u64,
    pub rows: Vec<(u64, UnwindRow)>,
}

fn collect<'a, S>(section: &S, bases: &BaseAddresses, out: &mut Vec<Fde>) -> Result<(), CfiError>
where
    S: UnwindSection<gimli::EndianSlice<'a, LittleEndian>>,
{
    let bad = |e: gimli::Error| CfiError::Bad(e.to_string());
    let mut ctx = UnwindContext::new();
    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next().map_err(bad)? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        // A malformed FDE costs that function its stacks, not the module its table.
        let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) else {
            continue;
        };
        let (start, end) = (fde.initial_address(), fde.end_address());
        if end <= start {
            continue;
        }
        let mut rows = Vec::new();
        let Ok(mut table) = fde.rows(section, bases, &mut ctx) else {
            continue;
        };
        while let Ok(Some(row)) = table.next_row() {
            let rbp = row.register(X86_64::RBP);
            let ra = row.register(X86_64::RA);
            rows.push((row.start_address(), rule(row.cfa(), ra, rbp)));
        }
        out.push(Fde { start, end, rows });
    }
    Ok(())
}

/// The compact form of one CFI row, or a `cfa::UNKNOWN` row.
pub fn rule<T: gimli::ReaderOffset>(
    cfa_rule: &CfaRule<T>,
    ra: Option<RegisterRule<T>>,
    rbp: Option<RegisterRule<T>>,
) -> UnwindRow {
    const UNKNOWN: UnwindRow = UnwindRow {
        pc: 0,
        cfa_offset: 0,
        cfa_reg: cfa::UNKNOWN,
        rbp_slot: 0,
    };
    match ra {
        Some(RegisterRule::Offset(-8)) => {}
        Some(RegisterRule::Undefined) => {
            return UnwindRow {
                cfa_reg: cfa::END,
                ..UNKNOWN
            };
        }
        _ => return UNKNOWN,
    }
    let CfaRule::RegisterAndOffset { register, offset } = cfa_rule else {
        return UNKNOWN;
    };
    let cfa_reg = match *register {
        r if r == X86_64::RSP => cfa::RSP,
        r if r == X86_64::RBP => cfa::RBP,
        Register(_) => return UNKNOWN,
    };
    let Ok(cfa_offset) = u16::try_from(*offset) else {
        return UNKNOWN;
    };
    let rbp_slot = match rbp {
        None | Some(RegisterRule::SameValue) | Some(RegisterRule::Undefined) => 0,
        Some(RegisterRule::Offset(n)) if n % 8 == 0 && n != 0 => match i8::try_from(n / 8) {
            Ok(slot) => slot,
            Err(_) => return UNKNOWN,
        },
        Some(_) => return UNKNOWN,
    };
    UnwindRow {
        pc: 0,
        cfa_offset,
        cfa_reg,
        rbp_slot,
    }
}

/// Sorts the functions' rows into one table: a function that overlaps an earlier
/// one is dropped (`.debug_frame` repeating `.eh_frame`), a gap between functions
/// gets an unknown row, and repeated rules are merged.
pub fn merge(mut fdes: Vec<Fde>) -> Result<Vec<UnwindRow>, CfiError> {
    fdes.sort_by_key(|f| f.start);
    let mut out: Vec<UnwindRow> = Vec::new();
    let mut covered_to = 0u64;
    let push = |out: &mut Vec<UnwindRow>, pc: u64, mut row: UnwindRow| {
        let pc = u32::try_from(pc).map_err(|_| CfiError::TooLarge)?;
        row.pc = pc;
        match out.last_mut() {
            Some(last) if last.pc == pc => *last = row,
            Some(last)
                if (last.cfa_offset, last.cfa_reg, last.rbp_slot)
                    == (row.cfa_offset, row.cfa_reg, row.rbp_slot) => {}
            _ => out.push(row),
        }
        Ok::<(), CfiError>(())
    };
    let unknown = UnwindRow::default();
    for fde in &fdes {
        if fde.start < covered_to {
            continue;
        }
        if fde.start > covered_to && !out.is_empty() {
            push(&mut out, covered_to, unknown)?;
        }
        for (pc, row) in &fde.rows {
            if (fde.start..fde.end).contains(pc) {
                push(&mut out, *pc, *row)?;
            }
        }
        covered_to = fde.end;
    }
    if !out.is_empty() {
        push(&mut out, covered_to, unknown)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cfa_reg: u8, cfa_offset: u16, rbp_slot: i8) -> UnwindRow {
        UnwindRow {
            pc: 0,
            cfa_offset,
            cfa_reg,
            rbp_slot,
        }
    }

    fn at(pc: u32, r: UnwindRow) -> UnwindRow {
        UnwindRow { pc, ..r }
    }

    #[test]
    fn rules_take_only_what_the_unwinder_can_follow() {
        let rsp = |offset| CfaRule::<usize>::RegisterAndOffset {
            register: X86_64::RSP,
            offset,
        };
        let ra = Some(RegisterRule::Offset(-8));
        assert_eq!(rule(&rsp(8), ra.clone(), None), row(cfa::RSP, 8, 0));
        assert_eq!(
            rule(&rsp(16), ra.clone(), Some(RegisterRule::Offset(-16))),
            row(cfa::RSP, 16, -2)
        );
        let rbp = CfaRule::<usize>::RegisterAndOffset {
            register: X86_64::RBP,
            offset: 16,
        };
        assert_eq!(
            rule(&rbp, ra.clone(), Some(RegisterRule::Offset(-16))),
            row(cfa::RBP, 16, -2)
        );
        // Another register, a negative offset, a misaligned rbp slot: stop there.
        let rax = CfaRule::<usize>::RegisterAndOffset {
            register: X86_64::RAX,
            offset: 8,
        };
        assert_eq!(rule(&rax, ra.clone(), None).cfa_reg, cfa::UNKNOWN);
        assert_eq!(rule(&rsp(-8), ra.clone(), None).cfa_reg, cfa::UNKNOWN);
        assert_eq!(
            rule(&rsp(16), ra, Some(RegisterRule::Offset(-12))).cfa_reg,
            cfa::UNKNOWN
        );
        // The return address elsewhere than CFA - 8: unknown; undefined: the end.
        assert_eq!(
            rule(&rsp(16), Some(RegisterRule::Offset(-16)), None).cfa_reg,
            cfa::UNKNOWN
        );
        assert_eq!(rule(&rsp(16), None, None).cfa_reg, cfa::UNKNOWN);
        assert_eq!(
            rule(&rsp(8), Some(RegisterRule::Undefined), None).cfa_reg,
            cfa::END
        );
    }

    #[test]
    fn merge_sorts_fills_gaps_and_drops_repeats() {
        let entry = row(cfa::RSP, 8, 0);
        let pushed = row(cfa::RSP, 16, -2);
        let f = |start, end, rows: Vec<(u64, UnwindRow)>| Fde { start, end, rows };
        let rows = merge(vec![
            f(0x200, 0x210, vec![(0x200, entry)]),
            f(
                0x100,
                0x120,
                vec![(0x100, entry), (0x101, pushed), (0x11f, entry)],
            ),
            // .debug_frame's copy of the first function: dropped.
            f(0x100, 0x120, vec![(0x100, pushed)]),
            // Adjacent: no gap row; same rule as the row before: merged.
            f(0x120, 0x130, vec![(0x120, entry)]),
        ])
        .unwrap();
        assert_eq!(
            rows,
            vec![
                at(0x100, entry),
                at(0x101, pushed),
                at(0x11f, entry),
                at(0x130, UnwindRow::default()),
                at(0x200, entry),
                at(0x210, UnwindRow::default()),
            ]
        );
    }

    #[test]
    fn pcs_above_4_gib_are_refused() {
        let fde = Fde {
            start: 1 << 32,
            end: (1 << 32) + 16,
            rows: vec![(1 << 32, row(cfa::RSP, 8, 0))],
        };
        assert_eq!(merge(vec![fde]), Err(CfiError::TooLarge));
    }

    #[test]
    fn own_executable_parses_and_its_rows_are_sorted() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let cfi = parse(&exe).unwrap();
        assert!(cfi.rows.len() > 1000, "{} rows", cfi.rows.len());
        assert!(cfi.rows.windows(2).all(|w| w[0].pc < w[1].pc));
        assert!(cfi.rows.iter().any(|r| r.cfa_reg == cfa::RSP));
        // The test binary is position independent and mapped by a PT_LOAD at 0.
        assert_eq!(cfi.bias(0x5555_0000_0000, 0), Some(0x5555_0000_0000));
    }

    #[test]
    fn garbage_is_not_elf() {
        assert!(matches!(parse(b"not an elf"), Err(CfiError::NotElf(_))));
    }
}
