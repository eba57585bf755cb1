//! A minimal reader for the kernel's BTF (BPF Type Format, Documentation/bpf/btf.rst).
//!
//! bindtrace only needs a few answers from it (member offsets, enum values, tracepoint
//! prototypes), but every record must be walked to number the types right. The blob is kept
//! as-is with one offset per type and records are decoded when asked for, so parsing vmlinux's
//! ~6 MB costs one pass and a few flat vectors, no allocation per type.
//!
//! Why ours and not a crate: btfparse (1.3.9, Apache-2.0, no dependencies) was compared with
//! this reader on the running 6.18 kernel and the 5.10, 6.1 and 6.18 fixtures and gave the same
//! answer for every member path, enum value and prototype bindtrace reads. But it parses
//! vmlinux in 156 to 213 ms instead of 22 to 28 ms and peaks at 68 MB instead of 18 MB, against
//! a 30 MB peak-RSS target for the whole tracer (BENCHMARKS.md). Its name lookup keeps one type
//! per name, the last one seen (215 structs shadowed by a same-named type on 6.18; on 5.10
//! `pt_regs` resolves to a forward declaration), so we would need our own name index anyway;
//! it has no lookup for enum values or function prototypes, which we would also write
//! ourselves; and it has one maintainer. Little of this file's job would move to the crate.

use std::cell::Cell;

const MAGIC: u16 = 0xeb9f;
/// Size of the version 1 header; `hdr_len` may be larger (later fields we do not know).
const HEADER_LEN: u32 = 24;
/// `struct btf_type`: name_off, info, size/type.
const TYPE_LEN: usize = 12;
const SYS_FS_PATH: &str = "/sys/kernel/btf/vmlinux";
/// BTF does not record the pointer width; bindtrace only runs on 64-bit kernels.
const POINTER_SIZE: u32 = 8;
/// Bound on chains of typedefs/modifiers and on anonymous nesting, so that a malformed blob
/// with a reference cycle ends in an error instead of a stack overflow.
const MAX_DEPTH: usize = 64;
/// Types visited to render one type: a prototype with several parameters pointing back to it
/// branches at every level, so the depth bound alone would still allow 2^64 steps.
const RENDER_BUDGET: usize = 4096;

/// Errors from parsing BTF or looking things up in it. Lookup errors name what was missing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BtfError {
    #[error(
        "cannot read {SYS_FS_PATH} ({source}): bindtrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoKernelBtf { source: std::io::Error },
    #[error("not BTF data: magic is {found:#06x}, expected {MAGIC:#06x}")]
    BadMagic { found: u16 },
    #[error("big-endian BTF is not supported")]
    BigEndian,
    #[error("unsupported BTF header: {0}")]
    BadHeader(String),
    #[error("BTF is truncated: {what} needs bytes {start}..{end}, the blob has {len}")]
    Truncated { what: String, start: usize, end: usize, len: usize },
    #[error("BTF type {id} has unknown kind {kind}")]
    UnknownKind { id: u32, kind: u8 },
    #[error("BTF refers to type {id}, but there are only {count} types")]
    BadTypeId { id: u32, count: usize },
    #[error("BTF string offset {offset} is outside the string section or not valid UTF-8")]
    BadString { offset: u32 },
    #[error("BTF type chain at type {id} is deeper than {MAX_DEPTH} (a reference cycle?)")]
    TooDeep { id: u32 },
    #[error("no {what} named `{name}` in the BTF")]
    NoType { what: &'static str, name: String },
    #[error("{container} has no member `{member}`")]
    NoMember { container: String, member: String },
    #[error("`{path}` is not a member path (expected `struct.member[.member...]`)")]
    BadPath { path: String },
    #[error("`{path}` has type `{ty}`, which is not a struct or union")]
    NotComposite { path: String, ty: String },
    #[error("`{path}` is not a bitfield of a kind_flag struct")]
    NotBitfield { path: String },
    #[error("`{path}` is a bitfield; it has no byte offset and size")]
    Bitfield { path: String },
    #[error("type `{ty}` has no size")]
    NoSize { ty: String },
    #[error("offset or size of `{path}` does not fit in 32 bits")]
    TooLarge { path: String },
    #[error("`{path}` is {size} bytes, expected {expected}")]
    WrongSize { path: String, size: u32, expected: u32 },
    #[error("`{path}` is {bits} bits wide, expected {expected}")]
    WrongBits { path: String, bits: u32, expected: u32 },
    #[error("{enum_name}::{enumerator} is {value}, which does not fit in a u32")]
    EnumOutOfRange { enum_name: String, enumerator: String, value: i64 },
    #[error("enum {enum_name} has no enumerator `{enumerator}`")]
    NoEnumerator { enum_name: String, enumerator: String },
    #[error("typedef {name} is `{ty}`, not a function prototype or a pointer to one")]
    NotFuncProto { name: String, ty: String },
}

impl BtfError {
    /// True when the blob is fine but the thing asked for is not in it (a kernel difference,
    /// not corruption): callers use this to treat optional kernel features as absent.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, Self::NoType { .. } | Self::NoMember { .. } | Self::NoEnumerator { .. })
    }
}

/// A struct/union member located by [`Btf::member`]: byte offset from the start of the outer
/// struct and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) offset: u32,
    pub(crate) size: u32,
}

/// Where a bitfield member lives: the byte holding its first bit, that bit's position, its width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BitField {
    pub(crate) byte: u32,
    pub(crate) bit: u8,
    pub(crate) bits: u32,
}

/// BTF kinds; the value is the `kind` field of `btf_type.info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int = 1,
    Ptr,
    Array,
    Struct,
    Union,
    Enum,
    Fwd,
    Typedef,
    Volatile,
    Const,
    Restrict,
    Func,
    FuncProto,
    Var,
    Datasec,
    Float,
    DeclTag,
    TypeTag,
    Enum64,
}

impl Kind {
    fn from_raw(raw: u8) -> Option<Kind> {
        use Kind::*;
        const ALL: [Kind; 19] = [
            Int, Ptr, Array, Struct, Union, Enum, Fwd, Typedef, Volatile, Const, Restrict, Func, FuncProto,
            Var, Datasec, Float, DeclTag, TypeTag, Enum64,
        ];
        ALL.get(usize::from(raw).checked_sub(1)?).copied()
    }

    /// Bytes of kind-specific data after the 12-byte `btf_type`. Getting one of these wrong
    /// shifts every later type id, so each follows btf.rst section 2.2 exactly.
    fn trailing_len(self, vlen: usize) -> usize {
        use Kind::*;
        match self {
            Int | Var | DeclTag => 4,              // u32 encoding / linkage / component_idx
            Array => 12,                           // struct btf_array
            Struct | Union | Datasec => 12 * vlen, // btf_member / btf_var_secinfo
            Enum | FuncProto => 8 * vlen,          // btf_enum / btf_param
            Enum64 => 12 * vlen,                   // btf_enum64
            Ptr | Fwd | Typedef | Volatile | Const | Restrict | Func | Float | TypeTag => 0,
        }
    }

    fn is_composite(self) -> bool {
        matches!(self, Kind::Struct | Kind::Union)
    }

    /// Kinds that only wrap another type without changing its layout.
    fn is_alias(self) -> bool {
        use Kind::*;
        matches!(self, Typedef | Volatile | Const | Restrict | TypeTag)
    }
}

/// One decoded `btf_type` plus its trailing data, borrowed from the blob.
#[derive(Clone, Copy)]
struct Type<'a> {
    id: u32,
    name_off: u32,
    kind: Kind,
    info: u32,
    /// `size` for INT, ENUM, STRUCT, UNION, FLOAT, DATASEC; `type` for the others.
    size_or_type: u32,
    extra: &'a [u8],
}

impl<'a> Type<'a> {
    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }

    /// `btf_member` records of a STRUCT/UNION.
    fn members(&self) -> impl Iterator<Item = RawMember> + 'a {
        self.extra.chunks_exact(12).map(|c| RawMember {
            name_off: le32(c, 0),
            ty: le32(c, 4),
            offset: le32(c, 8),
        })
    }
}

struct RawMember {
    name_off: u32,
    ty: u32,
    offset: u32,
}

/// A member found by name, possibly inside anonymous structs/unions.
struct Found {
    bit_offset: u64,
    ty: u32,
    /// Non-zero bitfield size from a `kind_flag` struct.
    bitfield: bool,
    /// That size in bits (0 when not a bitfield).
    bits: u32,
}

/// Parsed BTF: the raw blob plus an index of where each type starts.
pub(crate) struct Btf {
    data: Vec<u8>,
    /// Start and end of the string section in `data`.
    strs: (usize, usize),
    /// `offsets[id]` is where type `id` starts in `data`; `offsets[0]` stands for void.
    offsets: Vec<u32>,
    /// `hash32(name) << 32 | id` of every named type, sorted: the types of one name (and of
    /// any name with the same hash) are adjacent, by ascending id. 8 bytes a named type (1 MB
    /// on 6.18) where a hash map from hash to the first id plus a chain vector took 5 MB and
    /// was most of this parse's peak next to the blob.
    names: Vec<u64>,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf").field("bytes", &self.data.len()).field("types", &self.offsets.len()).finish()
    }
}

impl Btf {
    /// A BTF blob read elsewhere (the fixtures, the fuzz targets).
    pub(crate) fn from_bytes(raw: &[u8]) -> Result<Btf, BtfError> {
        Self::from_vec(raw.to_vec())
    }

    /// The running kernel's BTF.
    pub(crate) fn from_sys_fs() -> Result<Btf, BtfError> {
        let data = std::fs::read(SYS_FS_PATH).map_err(|source| BtfError::NoKernelBtf { source })?;
        Self::from_vec(data)
    }

    fn from_vec(data: Vec<u8>) -> Result<Btf, BtfError> {
        let header = Header::parse(&data)?;
        let offsets = index_types(&data, header.types)?;
        let mut btf = Btf { data, strs: header.strs, offsets, names: Vec::new() };
        btf.index_names()?;
        Ok(btf)
    }

    /// Number of types including void (id 0).
    pub(crate) fn type_count(&self) -> usize {
        self.offsets.len()
    }

    fn index_names(&mut self) -> Result<(), BtfError> {
        let mut names = Vec::with_capacity(self.offsets.len());
        for (id, &pos) in self.offsets.iter().enumerate().skip(1) {
            // `name_off` leads each record, which index_types checked: no need to decode it
            // all (decoding each record a second time here was ~10 M instructions at start-up).
            let name_off = le32(&self.data, pos as usize);
            if name_off == 0 {
                continue;
            }
            names.push(name_key(self.str_bytes(name_off)?, id as u32));
        }
        names.sort_unstable();
        names.shrink_to_fit();
        self.names = names;
        Ok(())
    }

    /// Types named `name`, in ascending id order.
    fn named<'s>(&'s self, name: &str) -> impl Iterator<Item = Type<'s>> {
        let first = name_key(name.as_bytes(), 0);
        let start = self.names.partition_point(|&k| k < first);
        self.names[start..]
            .iter()
            .take_while(move |&&k| k >> 32 == first >> 32)
            .filter_map(|&k| self.ty(k as u32).ok())
            .filter(move |t| self.str_bytes(t.name_off).ok() == Some(name.as_bytes()))
    }

    fn ty(&self, id: u32) -> Result<Type<'_>, BtfError> {
        let bad_id = || BtfError::BadTypeId { id, count: self.offsets.len() };
        if id == 0 {
            return Err(bad_id());
        }
        let pos = *self.offsets.get(id as usize).ok_or_else(bad_id)? as usize;
        // index_types checked every record, so this only fails if the blob changed under us.
        decode_type(&self.data, pos, usize::MAX).map(|(t, _)| Type { id, ..t }).map_err(|_| bad_id())
    }

    fn str_bytes(&self, offset: u32) -> Result<&[u8], BtfError> {
        let (start, end) = self.strs;
        let bad = || BtfError::BadString { offset };
        let from = start.checked_add(offset as usize).filter(|&s| s < end).ok_or_else(bad)?;
        let rest = self.data.get(from..end).ok_or_else(bad)?;
        let len = rest.iter().position(|&b| b == 0).ok_or_else(bad)?;
        Ok(&rest[..len])
    }

    fn str_at(&self, offset: u32) -> Result<&str, BtfError> {
        std::str::from_utf8(self.str_bytes(offset)?).map_err(|_| BtfError::BadString { offset })
    }

    /// Follows typedefs and qualifiers to the type that defines the layout (0 stays void).
    fn skip_aliases(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_DEPTH {
            if id == 0 {
                return Ok(0);
            }
            let t = self.ty(id)?;
            if !t.kind.is_alias() {
                return Ok(id);
            }
            id = t.size_or_type;
        }
        Err(BtfError::TooDeep { id })
    }

    /// Size in bytes of a type, as `sizeof` would give it.
    fn size_of(&self, id: u32) -> Result<u32, BtfError> {
        let no_size = || BtfError::NoSize { ty: self.render(id) };
        let id = self.skip_aliases(id)?;
        if id == 0 {
            return Err(no_size());
        }
        let t = self.ty(id)?;
        match t.kind {
            Kind::Int | Kind::Enum | Kind::Enum64 | Kind::Struct | Kind::Union | Kind::Float => {
                Ok(t.size_or_type)
            }
            Kind::Ptr => Ok(POINTER_SIZE),
            Kind::Array => {
                let elem = self.size_of_elem(le32(t.extra, 0))?;
                elem.checked_mul(le32(t.extra, 8)).ok_or_else(no_size)
            }
            _ => Err(no_size()),
        }
    }

    /// Array element size; a separate step so that nested arrays recurse with a depth bound.
    fn size_of_elem(&self, elem: u32) -> Result<u32, BtfError> {
        let mut id = self.skip_aliases(elem)?;
        let mut count = 1u32;
        for _ in 0..MAX_DEPTH {
            match self.ty(id) {
                Ok(t) if t.kind == Kind::Array => {
                    count = count
                        .checked_mul(le32(t.extra, 8))
                        .ok_or(BtfError::NoSize { ty: self.render(elem) })?;
                    id = self.skip_aliases(le32(t.extra, 0))?;
                }
                _ => {
                    let size = self.size_of(id)?;
                    return size.checked_mul(count).ok_or(BtfError::NoSize { ty: self.render(elem) });
                }
            }
        }
        Err(BtfError::TooDeep { id })
    }

    /// The struct or union called `name`. Several types can share a name (a forward
    /// declaration, an empty duplicate); the one with a non-zero size wins, then the lowest id.
    /// A typedef of an anonymous struct (`possible_net_t`) is accepted as a last resort.
    fn composite_by_name(&self, name: &str) -> Result<Type<'_>, BtfError> {
        let mut best: Option<(u8, Type<'_>)> = None;
        for t in self.named(name) {
            let candidate = match t.kind {
                k if k.is_composite() && t.size_or_type > 0 => Some((3, t)),
                k if k.is_composite() => Some((2, t)),
                Kind::Typedef => self.composite(t.size_or_type)?.map(|c| (1, c)),
                _ => None,
            };
            if let Some(c) = candidate.filter(|c| best.is_none_or(|b| c.0 > b.0)) {
                best = Some(c);
            }
        }
        best.map(|(_, t)| t)
            .ok_or_else(|| BtfError::NoType { what: "struct or union", name: name.to_owned() })
    }

    /// The struct/union behind `id` after typedefs and qualifiers, if it is one.
    fn composite(&self, id: u32) -> Result<Option<Type<'_>>, BtfError> {
        let id = self.skip_aliases(id)?;
        if id == 0 {
            return Ok(None);
        }
        let t = self.ty(id)?;
        Ok(t.kind.is_composite().then_some(t))
    }

    /// Finds member `name` of a struct/union. C puts the members of anonymous structs/unions
    /// in the enclosing scope (sk_buff hides most fields that way), so those are searched too.
    fn find_member(&self, outer: Type<'_>, name: &[u8], depth: usize) -> Result<Option<Found>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep { id: outer.id });
        }
        for m in outer.members() {
            let (bit_offset, bitfield_size) =
                if outer.kind_flag() { (m.offset & 0x00ff_ffff, m.offset >> 24) } else { (m.offset, 0) };
            if m.name_off != 0 {
                if self.str_bytes(m.name_off)? == name {
                    return Ok(Some(Found {
                        bit_offset: u64::from(bit_offset),
                        ty: m.ty,
                        bitfield: bitfield_size != 0,
                        bits: bitfield_size,
                    }));
                }
            } else if let Some(inner) = self.composite(m.ty)?
                && let Some(found) = self.find_member(inner, name, depth + 1)?
            {
                return Ok(Some(Found { bit_offset: found.bit_offset + u64::from(bit_offset), ..found }));
            }
        }
        Ok(None)
    }

    /// An INT narrower than its storage (old-style bitfield without `kind_flag`).
    fn is_int_bitfield(&self, id: u32) -> Result<bool, BtfError> {
        let id = self.skip_aliases(id)?;
        if id == 0 {
            return Ok(false);
        }
        let t = self.ty(id)?;
        if t.kind != Kind::Int {
            return Ok(false);
        }
        let encoding = le32(t.extra, 0);
        let (bits, bit_offset) = (encoding & 0xff, (encoding >> 16) & 0xff);
        Ok(bit_offset != 0 || u64::from(bits) != u64::from(t.size_or_type) * 8)
    }

    /// Offset of a member the eBPF programs read with a fixed width: a member of another size
    /// would be read wrong in the kernel, so it is an error here.
    pub(crate) fn member_offset(&self, path: &str, expected: u32) -> Result<u32, BtfError> {
        let member = self.member(path)?;
        if member.size != expected {
            return Err(BtfError::WrongSize { path: path.to_owned(), size: member.size, expected });
        }
        Ok(member.offset)
    }

    /// Member at a dotted path from a named struct/union, e.g. "sk_buff.dev",
    /// "net_device.nd_net.net", "net.ns.inum". Each step also looks inside anonymous
    /// structs/unions and follows typedefs/qualifiers to the struct of a named member for the
    /// next step. Returns the byte offset from the start of the outer struct and the size of
    /// the last member; a bitfield is an error.
    pub(crate) fn member(&self, path: &str) -> Result<Member, BtfError> {
        let (walked, bit_offset, found) = self.locate(path)?;
        self.finish_member(&walked, bit_offset, &found)
    }

    /// A one-bit (or wider) bitfield member at a dotted path, as [`Btf::member`] walks it: the
    /// byte that holds its first bit, the bit's position in that byte (bitfields are allocated
    /// from the low bit on the little-endian kernels bindtrace runs on) and its width. Only
    /// `kind_flag` structs (what pahole emits for the kernel) record the width per member.
    pub(crate) fn bitfield(&self, path: &str) -> Result<BitField, BtfError> {
        let (_, bit_offset, found) = self.locate(path)?;
        if !found.bitfield {
            return Err(BtfError::NotBitfield { path: path.into() });
        }
        let byte = u32::try_from(bit_offset / 8).map_err(|_| BtfError::TooLarge { path: path.into() })?;
        Ok(BitField { byte, bit: (bit_offset % 8) as u8, bits: found.bits })
    }

    fn locate(&self, path: &str) -> Result<(String, u64, Found), BtfError> {
        let steps: Vec<&str> = path.split('.').collect();
        let [root, members @ ..] = steps.as_slice() else {
            return Err(BtfError::BadPath { path: path.into() });
        };
        if members.is_empty() || steps.iter().any(|s| s.is_empty()) {
            return Err(BtfError::BadPath { path: path.into() });
        }
        let mut outer = self.composite_by_name(root)?;
        // A typedef'd anonymous struct is best named by the typedef the caller used.
        let mut container = match outer.name_off {
            0 => (*root).to_owned(),
            _ => self.render(outer.id),
        };
        let mut bit_offset = 0u64;
        for (i, step) in members.iter().enumerate() {
            let walked = steps[..i + 2].join(".");
            let found = self.find_member(outer, step.as_bytes(), 0)?.ok_or_else(|| BtfError::NoMember {
                container: container.clone(),
                member: (*step).to_owned(),
            })?;
            bit_offset += found.bit_offset;
            if i + 1 == members.len() {
                return Ok((walked, bit_offset, found));
            }
            outer = self
                .composite(found.ty)?
                .ok_or_else(|| BtfError::NotComposite { path: walked.clone(), ty: self.render(found.ty) })?;
            container = self.render(found.ty);
        }
        Err(BtfError::BadPath { path: path.into() })
    }

    fn finish_member(&self, path: &str, bit_offset: u64, found: &Found) -> Result<Member, BtfError> {
        if found.bitfield || !bit_offset.is_multiple_of(8) || self.is_int_bitfield(found.ty)? {
            return Err(BtfError::Bitfield { path: path.into() });
        }
        let offset = u32::try_from(bit_offset / 8).map_err(|_| BtfError::TooLarge { path: path.into() })?;
        Ok(Member { offset, size: self.size_of(found.ty)? })
    }

    /// Value of an enumerator of a named enum (ENUM or ENUM64). An unsigned ENUM64 value above
    /// `i64::MAX` comes back as its two's complement bit pattern.
    pub(crate) fn enum_value(&self, enum_name: &str, enumerator: &str) -> Result<i64, BtfError> {
        let mut saw_enum = false;
        for t in self.named(enum_name) {
            if !matches!(t.kind, Kind::Enum | Kind::Enum64) {
                continue;
            }
            saw_enum = true;
            if let Some(value) = self.enumerator(t, enumerator.as_bytes())? {
                return Ok(value);
            }
        }
        Err(if saw_enum {
            BtfError::NoEnumerator { enum_name: enum_name.to_owned(), enumerator: enumerator.to_owned() }
        } else {
            BtfError::NoType { what: "enum", name: enum_name.to_owned() }
        })
    }

    fn enumerator(&self, t: Type<'_>, name: &[u8]) -> Result<Option<i64>, BtfError> {
        let width = if t.kind == Kind::Enum64 { 12 } else { 8 };
        for e in t.extra.chunks_exact(width) {
            if self.str_bytes(le32(e, 0))? != name {
                continue;
            }
            // kind_flag marks a signed enum; ENUM64 keeps the high half in a third word.
            let value = match (t.kind, t.kind_flag()) {
                (Kind::Enum64, _) => ((u64::from(le32(e, 8)) << 32) | u64::from(le32(e, 4))) as i64,
                (_, true) => i64::from(le32(e, 4) as i32),
                (_, false) => i64::from(le32(e, 4)),
            };
            return Ok(Some(value));
        }
        Ok(None)
    }

    /// Parameter types, rendered C-like, of the FUNC_PROTO behind a typedef such as
    /// "btf_trace_tcp_send_reset" (typedef -> pointer -> func_proto), e.g.
    /// `["void *", "const struct sock *", "const struct sk_buff *", "const enum sk_rst_reason"]`.
    pub(crate) fn func_proto_params(&self, typedef_name: &str) -> Result<Vec<String>, BtfError> {
        let typedef = self
            .named(typedef_name)
            .find(|t| t.kind == Kind::Typedef)
            .ok_or_else(|| BtfError::NoType { what: "typedef", name: typedef_name.to_owned() })?;
        let not_proto = || BtfError::NotFuncProto {
            name: typedef_name.to_owned(),
            ty: self.render(typedef.size_or_type),
        };
        let mut id = self.skip_aliases(typedef.size_or_type)?;
        if id == 0 {
            return Err(not_proto());
        }
        if self.ty(id)?.kind == Kind::Ptr {
            id = self.skip_aliases(self.ty(id)?.size_or_type)?;
        }
        let proto = self.ty(id).map_err(|_| not_proto())?;
        if proto.kind != Kind::FuncProto {
            return Err(not_proto());
        }
        Ok(self.params(proto, 0, &Cell::new(RENDER_BUDGET)))
    }

    /// The types aya's program loaders look up, for [`ProgramTypes::aya_btf`]: typedefs
    /// `btf_trace_<tp>` and FUNCs by name, each the lowest id of that name and kind (the same
    /// choice as aya's `id_by_type_name_kind`). A name this BTF lacks is left out, so aya's
    /// lookup fails as it would on the full BTF. Small and owned: this parse can go first.
    pub(crate) fn program_types(&self, typedefs: &[String], funcs: &[&str]) -> ProgramTypes {
        let wanted = typedefs
            .iter()
            .map(|n| (Kind::Typedef, n.as_str()))
            .chain(funcs.iter().map(|&n| (Kind::Func, n)));
        let mut found: Vec<(u32, String, [u8; TYPE_LEN])> = wanted
            .filter_map(|(kind, name)| self.named(name).find(|t| t.kind == kind).map(|t| (t.id, name)))
            .map(|(id, name)| {
                let pos = self.offsets[id as usize] as usize;
                let mut record = [0; TYPE_LEN];
                // Neither TYPEDEF nor FUNC has trailing data, so these 12 bytes are all of it.
                record.copy_from_slice(&self.data[pos..pos + TYPE_LEN]);
                (id, name.to_owned(), record)
            })
            .collect();
        found.sort_unstable_by_key(|f| f.0);
        found.dedup_by_key(|f| f.0);
        ProgramTypes { found }
    }

    /// Rendered parameter types of a FUNC_PROTO; a final void parameter means `...`. `depth`
    /// is the prototype's own: a parameter that points back to its prototype (a corrupt or
    /// hostile blob) must hit the depth bound, not recurse until the stack overflows.
    fn params(&self, proto: Type<'_>, depth: usize, budget: &Cell<usize>) -> Vec<String> {
        proto
            .extra
            .chunks_exact(8)
            .map(|p| match le32(p, 4) {
                0 => "...".to_owned(),
                ty => self.render_depth(ty, depth + 1, budget),
            })
            .collect()
    }

    /// C spelling of a type, for messages and prototypes. Never fails: a broken reference
    /// shows up as `<bad type N>`. Type tags (`__user`, `__rcu`) are left out, as C has them
    /// only as attributes.
    fn render(&self, id: u32) -> String {
        self.render_depth(id, 0, &Cell::new(RENDER_BUDGET))
    }

    fn render_depth(&self, id: u32, depth: usize, budget: &Cell<usize>) -> String {
        if id == 0 {
            return "void".into();
        }
        if depth > MAX_DEPTH {
            return "<too deep>".into();
        }
        if budget.get() == 0 {
            return "<too long>".into();
        }
        budget.set(budget.get() - 1);
        let Ok(t) = self.ty(id) else {
            return format!("<bad type {id}>");
        };
        let name = match self.str_at(t.name_off) {
            Ok("") => "(anon)",
            Ok(name) => name,
            Err(_) => "<bad name>",
        };
        let inner = || self.render_depth(t.size_or_type, depth + 1, budget);
        match t.kind {
            Kind::Int | Kind::Float | Kind::Typedef | Kind::Func | Kind::Var | Kind::Datasec => name.into(),
            Kind::Struct => format!("struct {name}"),
            Kind::Union => format!("union {name}"),
            Kind::Enum | Kind::Enum64 => format!("enum {name}"),
            Kind::Fwd if t.kind_flag() => format!("union {name}"),
            Kind::Fwd => format!("struct {name}"),
            Kind::Ptr => self.render_pointer(t.size_or_type, depth, budget),
            Kind::Const | Kind::Volatile | Kind::Restrict => {
                let qualifier = match t.kind {
                    Kind::Const => "const",
                    Kind::Volatile => "volatile",
                    _ => "restrict",
                };
                // A qualified pointer is spelled after the star: `char * const`.
                match self.ty(t.size_or_type) {
                    Ok(target) if target.kind == Kind::Ptr => format!("{} {qualifier}", inner()),
                    _ => format!("{qualifier} {}", inner()),
                }
            }
            Kind::TypeTag | Kind::DeclTag => inner(),
            Kind::Array => {
                let elem = self.render_depth(le32(t.extra, 0), depth + 1, budget);
                format!("{elem}[{}]", le32(t.extra, 8))
            }
            Kind::FuncProto => self.render_proto(t, "", depth, budget),
        }
    }

    fn render_pointer(&self, target: u32, depth: usize, budget: &Cell<usize>) -> String {
        let pointee = self.skip_tags(target);
        if let Ok(proto) = self.ty(pointee)
            && proto.kind == Kind::FuncProto
        {
            return self.render_proto(proto, "(*)", depth, budget);
        }
        let inner = self.render_depth(target, depth + 1, budget);
        if inner.ends_with('*') { format!("{inner}*") } else { format!("{inner} *") }
    }

    fn skip_tags(&self, mut id: u32) -> u32 {
        for _ in 0..MAX_DEPTH {
            match self.ty(id) {
                Ok(t) if t.kind == Kind::TypeTag => id = t.size_or_type,
                _ => break,
            }
        }
        id
    }

    fn render_proto(&self, proto: Type<'_>, declarator: &str, depth: usize, budget: &Cell<usize>) -> String {
        let ret = self.render_depth(proto.size_or_type, depth + 1, budget);
        let params = self.params(proto, depth, budget);
        let params = if params.is_empty() { "void".into() } else { params.join(", ") };
        format!("{ret} {declarator}({params})")
    }
}

/// Where the sections are, from the fixed part of `struct btf_header`.
struct Header {
    types: (usize, usize),
    strs: (usize, usize),
}

/// What aya's program loaders need from the kernel's BTF ([`Btf::program_types`]).
#[derive(Debug)]
pub(crate) struct ProgramTypes {
    /// (type id, name, the kernel's 12-byte record), by ascending id.
    found: Vec<(u32, String, [u8; TYPE_LEN])>,
}

impl ProgramTypes {
    /// The BTF aya's program loaders are given instead of aya's own parse of vmlinux.
    ///
    /// `BtfTracePoint::load(tp, btf)` and `FExit::load(function, btf)` (aya 0.14) only look up
    /// the first TYPEDEF `btf_trace_<tp>`, resp. the first FUNC `<function>`, by name, and hand
    /// its position in `btf` to the kernel as `attach_btf_id`. So positions must be the
    /// kernel's type ids: each found type sits at its id (its record copied, its name
    /// re-pointed into a new string section), and every other id up to the highest holds an
    /// empty kind-0 record, which aya reads as `BtfType::Unknown` and skips. It costs 12 bytes a
    /// type in the blob and one 72-byte `BtfType` in aya's parse up to the highest id (about
    /// 50 000 of 126 000 on 6.18: 4.7 MB), instead of aya's ~16 MB parse of everything.
    pub(crate) fn aya_btf(&self) -> Result<aya::Btf, BtfError> {
        let last = self.found.last().map_or(0, |f| f.0) as usize;
        let too_large = || BtfError::TooLarge { path: "the program BTF".to_owned() };
        let type_len = u32::try_from(last * TYPE_LEN).map_err(|_| too_large())?;
        // Header, then the type section (ids 1..=last, zeroed), then the strings.
        let mut blob = vec![0u8; HEADER_LEN as usize + type_len as usize];
        let mut strs = vec![0u8];
        for (id, name, record) in &self.found {
            let at = HEADER_LEN as usize + (*id as usize - 1) * TYPE_LEN;
            blob[at..at + TYPE_LEN].copy_from_slice(record);
            let name_off = u32::try_from(strs.len()).map_err(|_| too_large())?;
            blob[at..at + 4].copy_from_slice(&name_off.to_le_bytes());
            strs.extend_from_slice(name.as_bytes());
            strs.push(0);
        }
        let str_len = u32::try_from(strs.len()).map_err(|_| too_large())?;
        blob[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        blob[2] = 1; // version; flags stay 0
        for (i, word) in [HEADER_LEN, 0, type_len, type_len, str_len].into_iter().enumerate() {
            blob[4 + 4 * i..8 + 4 * i].copy_from_slice(&word.to_le_bytes());
        }
        blob.extend_from_slice(&strs);
        aya::Btf::parse(&blob, aya::Endianness::Little).map_err(|e| {
            BtfError::BadHeader(format!("aya rejects the program BTF built from the kernel's: {e}"))
        })
    }
}

impl Header {
    fn parse(data: &[u8]) -> Result<Header, BtfError> {
        let field = |at: usize, len: usize| {
            data.get(at..at + len).ok_or_else(|| BtfError::Truncated {
                what: "the BTF header".into(),
                start: 0,
                end: HEADER_LEN as usize,
                len: data.len(),
            })
        };
        let magic = field(0, 2)?;
        let magic = u16::from_le_bytes([magic[0], magic[1]]);
        if magic == MAGIC.swap_bytes() {
            return Err(BtfError::BigEndian);
        }
        if magic != MAGIC {
            return Err(BtfError::BadMagic { found: magic });
        }
        let version = field(2, 1)?[0];
        if version != 1 {
            return Err(BtfError::BadHeader(format!("version {version}, expected 1")));
        }
        let word = |i: usize| field(4 + 4 * i, 4).map(|b| le32(b, 0));
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (word(0)?, word(1)?, word(2)?, word(3)?, word(4)?);
        if hdr_len < HEADER_LEN {
            return Err(BtfError::BadHeader(format!("hdr_len {hdr_len} is shorter than {HEADER_LEN}")));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(BtfError::BadHeader("blob larger than 4 GiB".into()));
        }
        Ok(Header {
            types: section(data.len(), hdr_len, type_off, type_len, "the type section")?,
            strs: section(data.len(), hdr_len, str_off, str_len, "the string section")?,
        })
    }
}

/// Byte range of a section given relative to the end of the header, checked against the blob.
fn section(len: usize, hdr_len: u32, off: u32, size: u32, what: &str) -> Result<(usize, usize), BtfError> {
    let start = u64::from(hdr_len) + u64::from(off);
    let end = start + u64::from(size);
    if end > len as u64 {
        return Err(BtfError::Truncated { what: what.into(), start: start as usize, end: end as usize, len });
    }
    Ok((start as usize, end as usize))
}

/// Walks the type section once and records where each type starts. Every record (including
/// its trailing data) is checked to lie inside the section, so later decoding cannot fail.
fn index_types(data: &[u8], (start, end): (usize, usize)) -> Result<Vec<u32>, BtfError> {
    // vmlinux averages well over 30 bytes a type; this avoids most regrowth.
    let mut offsets = Vec::with_capacity((end - start) / 32 + 1);
    offsets.push(0); // void
    let mut pos = start;
    while pos < end {
        let id = offsets.len() as u32;
        let (_, next) = decode_type(data, pos, end).map_err(|e| match e {
            BtfError::UnknownKind { kind, .. } => BtfError::UnknownKind { id, kind },
            BtfError::Truncated { start, end, len, .. } => {
                BtfError::Truncated { what: format!("type {id}"), start, end, len }
            }
            other => other,
        })?;
        offsets.push(pos as u32);
        pos = next;
    }
    Ok(offsets)
}

/// Decodes the record at `pos` (which must end by `limit`) and returns it with the position
/// of the next record. The returned type has id 0; callers fill it in.
fn decode_type(data: &[u8], pos: usize, limit: usize) -> Result<(Type<'_>, usize), BtfError> {
    let limit = limit.min(data.len());
    let truncated = |end: usize| BtfError::Truncated { what: "type".into(), start: pos, end, len: limit };
    let head_end = pos.checked_add(TYPE_LEN).ok_or_else(|| truncated(usize::MAX))?;
    let head = data.get(pos..head_end).filter(|_| head_end <= limit).ok_or_else(|| truncated(head_end))?;
    let info = le32(head, 4);
    let raw_kind = ((info >> 24) & 0x1f) as u8;
    let kind = Kind::from_raw(raw_kind).ok_or(BtfError::UnknownKind { id: 0, kind: raw_kind })?;
    let end = head_end + kind.trailing_len((info & 0xffff) as usize);
    let extra = data.get(head_end..end).filter(|_| end <= limit).ok_or_else(|| truncated(end))?;
    let t = Type { id: 0, name_off: le32(head, 0), kind, info, size_or_type: le32(head, 8), extra };
    Ok((t, end))
}

/// Little-endian u32 at `at`; callers only pass slices whose length was checked when the
/// record was indexed, so the 0 fallback is never seen for a parsed blob.
fn le32(bytes: &[u8], at: usize) -> u32 {
    bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes)
}

/// A name's sort key in `Btf::names`: FNV-1a (cheap, and spreads identifier names well; a
/// collision only costs a string compare) folded to 32 bits, above the type id.
fn name_key(bytes: &[u8], id: u32) -> u64 {
    let h = bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    (((h >> 32) ^ h) << 32) | u64::from(id)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};
    use std::io::Read;
    use std::sync::{Mutex, OnceLock};

    /// Uncompressed fixture from testdata/btf (see the README there for provenance).
    pub(crate) fn fixture_bytes(name: &str) -> Vec<u8> {
        let path = format!("{}/testdata/btf/{name}", env!("CARGO_MANIFEST_DIR"));
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(file).read_to_end(&mut raw).unwrap_or_else(|e| panic!("{path}: {e}"));
        raw
    }

    /// Parsed fixture, shared by all tests of the process (parsing in debug builds is slow).
    pub(crate) fn fixture(name: &str) -> &'static Btf {
        static CACHE: OnceLock<Mutex<HashMap<String, &'static Btf>>> = OnceLock::new();
        let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
        cache.entry(name.to_owned()).or_insert_with(|| {
            let btf = Btf::from_bytes(&fixture_bytes(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            Box::leak(Box::new(btf))
        })
    }

    pub(crate) const V6_18: &str = "vmlinux-6.18.btf.gz";
    pub(crate) const V6_1: &str = "vmlinux-6.1.btf.gz";
    pub(crate) const V5_10: &str = "vmlinux-5.10.btf.gz";

    fn kinds(btf: &Btf) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for id in 1..btf.type_count() as u32 {
            *counts.entry(format!("{:?}", btf.ty(id).unwrap().kind)).or_default() += 1;
        }
        counts
    }

    fn member(btf: &Btf, path: &str) -> (u32, u32) {
        let m = btf.member(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        (m.offset, m.size)
    }

    fn err(result: Result<impl std::fmt::Debug, BtfError>) -> String {
        result.expect_err("expected an error").to_string()
    }

    #[test]
    fn fixtures_walk_every_kind() {
        // A wrong trailing size for any kind would shift the rest of the section and end in an
        // unknown kind or a truncated record, so parsing at all is most of the check; the
        // offsets below check that ids still line up at the end of the section.
        let k = kinds(fixture(V6_18));
        for kind in [
            "Int",
            "Ptr",
            "Array",
            "Struct",
            "Union",
            "Enum",
            "Fwd",
            "Typedef",
            "Volatile",
            "Const",
            "Restrict",
            "Func",
            "FuncProto",
            "Var",
            "Datasec",
            "Float",
            "DeclTag",
            "TypeTag",
            "Enum64",
        ] {
            assert!(k.contains_key(kind), "6.18 BTF has no {kind}: {k:?}");
        }
        assert_eq!(fixture(V6_18).type_count(), 126_611);
        assert_eq!(fixture(V6_1).type_count(), 100_751);
        assert_eq!(fixture(V5_10).type_count(), 83_142);
    }

    #[test]
    fn offsets_6_18_match_pahole() {
        let btf = fixture(V6_18);
        assert_eq!(member(btf, "sk_buff.dev"), (16, 8));
        assert_eq!(member(btf, "sk_buff.head"), (192, 8));
        assert_eq!(member(btf, "sk_buff.transport_header"), (178, 2));
        assert_eq!(member(btf, "sk_buff.network_header"), (180, 2));
        assert_eq!(member(btf, "sk_buff.skb_iif"), (144, 4));
        assert_eq!(member(btf, "net_device.ifindex"), (224, 4));
        assert_eq!(member(btf, "net_device.nd_net"), (264, 8));
        assert_eq!(member(btf, "net_device.nd_net.net"), (264, 8));
        assert_eq!(member(btf, "net.net_cookie"), (4160, 8));
        assert_eq!(member(btf, "net.ns"), (152, 80));
        assert_eq!(member(btf, "net.ns.inum"), (176, 4));
        // 6.18's ns_common: ns_type and a hole come first, ns_id sits in an anonymous struct
        // inside an anonymous union.
        assert_eq!(member(btf, "ns_common.inum"), (24, 4));
        assert_eq!(member(btf, "ns_common.ns_id"), (32, 8));
        // A typedef of an anonymous struct works as the root too.
        assert_eq!(member(btf, "possible_net_t.net"), (0, 8));
    }

    /// The small BTF must answer aya's lookups exactly as aya's full parse of the same kernel
    /// does: these ids go to the kernel as attach targets.
    #[test]
    fn program_btf_gives_aya_the_ids_of_its_full_parse() {
        use aya_obj::btf::BtfKind;
        let typedefs: Vec<String> =
            ["tcp_send_reset", "kfree_skb", "inet_sock_set_state", "tcp_receive_reset", "sock_recv_length"]
                .iter()
                .map(|tp| format!("btf_trace_{tp}"))
                .collect();
        let funcs = ["__ip4_datagram_connect", "__ip6_datagram_connect", "no_such_function"];
        for name in [V6_18, V6_1, V5_10] {
            let full = aya::Btf::parse(&fixture_bytes(name), aya::Endianness::Little).unwrap();
            let small = fixture(name).program_types(&typedefs, &funcs).aya_btf().unwrap();
            let lookups = typedefs
                .iter()
                .map(|n| (n.as_str(), BtfKind::Typedef))
                .chain(funcs.iter().map(|&n| (n, BtfKind::Func)))
                // Asked for as the other kind: each must miss, or both find the same id.
                .chain([
                    ("btf_trace_kfree_skb", BtfKind::Func),
                    ("__ip4_datagram_connect", BtfKind::Typedef),
                ]);
            let mut found = 0;
            for (n, kind) in lookups {
                let want = full.id_by_type_name_kind(n, kind).ok();
                assert_eq!(small.id_by_type_name_kind(n, kind).ok(), want, "{name}: {n} ({kind:?})");
                found += usize::from(want.is_some());
            }
            // tcp_send_reset exists on all three; sock_recv_length only from 6.3.
            assert!(found >= 4, "{name}: only {found} of the names exist");
        }
    }

    #[test]
    fn offsets_6_1_and_5_10_match_pahole() {
        // Cross-checked with pahole 1.24 -F btf on the extracted vmlinux files.
        let btf = fixture(V6_1);
        assert_eq!(member(btf, "sk_buff.dev"), (16, 8));
        assert_eq!(member(btf, "sk_buff.head"), (200, 8));
        assert_eq!(member(btf, "sk_buff.transport_header"), (182, 2));
        assert_eq!(member(btf, "sk_buff.network_header"), (184, 2));
        assert_eq!(member(btf, "net_device.ifindex"), (216, 4));
        assert_eq!(member(btf, "net_device.nd_net.net"), (1280, 8));
        assert_eq!(member(btf, "net.net_cookie"), (4096, 8));
        assert_eq!(member(btf, "net.ns"), (128, 24));
        assert_eq!(member(btf, "net.ns.inum"), (144, 4));

        let btf = fixture(V5_10);
        assert_eq!(member(btf, "sk_buff.head"), (192, 8));
        assert_eq!(member(btf, "net_device.ifindex"), (256, 4));
        assert_eq!(member(btf, "net_device.nd_net.net"), (1264, 8));
        // atomic64_t on 5.10 (u64 from 5.12): still 8 bytes.
        assert_eq!(member(btf, "net.net_cookie"), (4480, 8));
        assert_eq!(member(btf, "net.ns.inum"), (144, 4));
    }

    #[test]
    fn enum_values_differ_between_kernels() {
        let reason = |btf: &Btf, e, v| btf.enum_value(e, v).unwrap();
        let v6_18 = fixture(V6_18);
        assert_eq!(reason(v6_18, "skb_drop_reason", "SKB_DROP_REASON_NO_SOCKET"), 3);
        assert_eq!(reason(v6_18, "sk_rst_reason", "SK_RST_REASON_NO_SOCKET"), 1);
        assert_eq!(reason(fixture(V6_1), "skb_drop_reason", "SKB_DROP_REASON_NO_SOCKET"), 2);
        assert_eq!(
            err(fixture(V6_1).enum_value("sk_rst_reason", "SK_RST_REASON_NO_SOCKET")),
            "no enum named `sk_rst_reason` in the BTF"
        );
        assert_eq!(
            err(fixture(V5_10).enum_value("skb_drop_reason", "SKB_DROP_REASON_NO_SOCKET")),
            "no enum named `skb_drop_reason` in the BTF"
        );
    }

    #[test]
    fn tracepoint_prototypes() {
        let params = |name, btf: &Btf| btf.func_proto_params(name).unwrap();
        assert_eq!(
            params("btf_trace_tcp_send_reset", fixture(V6_18)),
            ["void *", "const struct sock *", "const struct sk_buff *", "const enum sk_rst_reason"]
        );
        assert_eq!(
            params("btf_trace_kfree_skb", fixture(V6_18)),
            ["void *", "struct sk_buff *", "void *", "enum skb_drop_reason", "struct sock *"]
        );
        assert_eq!(
            params("btf_trace_tcp_send_reset", fixture(V6_1)),
            ["void *", "const struct sock *", "const struct sk_buff *"]
        );
        assert_eq!(
            params("btf_trace_kfree_skb", fixture(V6_1)),
            ["void *", "struct sk_buff *", "void *", "enum skb_drop_reason"]
        );
        assert_eq!(params("btf_trace_kfree_skb", fixture(V5_10)), ["void *", "struct sk_buff *", "void *"]);
    }

    #[test]
    fn lookup_errors_name_what_is_missing() {
        let btf = fixture(V6_18);
        assert_eq!(
            err(btf.member("no_such_struct.x")),
            "no struct or union named `no_such_struct` in the BTF"
        );
        assert_eq!(err(btf.member("sk_buff.no_such")), "struct sk_buff has no member `no_such`");
        assert_eq!(err(btf.member("net.ns.no_such")), "struct ns_common has no member `no_such`");
        assert_eq!(err(btf.member("net_device.nd_net.x")), "possible_net_t has no member `x`");
        assert_eq!(
            err(btf.member("sk_buff.dev.ifindex")),
            "`sk_buff.dev` has type `struct net_device *`, which is not a struct or union"
        );
        assert_eq!(
            err(btf.member("sk_buff.pkt_type")),
            "`sk_buff.pkt_type` is a bitfield; it has no byte offset and size"
        );
        for path in ["sk_buff", "sk_buff.", "sk_buff..dev", ""] {
            assert!(err(btf.member(path)).contains("is not a member path"), "{path}");
        }
        assert_eq!(
            err(btf.enum_value("skb_drop_reason", "NOPE")),
            "enum skb_drop_reason has no enumerator `NOPE`"
        );
        assert_eq!(
            err(btf.func_proto_params("btf_trace_nope")),
            "no typedef named `btf_trace_nope` in the BTF"
        );
        assert_eq!(
            err(btf.func_proto_params("possible_net_t")),
            "typedef possible_net_t is `struct (anon)`, not a function prototype or a pointer to one"
        );
        assert!(btf.member("sk_buff.nope").unwrap_err().is_not_found());
    }

    #[test]
    fn rejects_wrong_magic() {
        let mut raw = Builder::default().build();
        raw[0] = 0x7f;
        assert_eq!(err(Btf::from_bytes(&raw)), "not BTF data: magic is 0xeb7f, expected 0xeb9f");
        raw[..2].copy_from_slice(&[0xeb, 0x9f]);
        assert_eq!(err(Btf::from_bytes(&raw)), "big-endian BTF is not supported");
        assert!(matches!(Btf::from_bytes(b"\x7fELF\x02\x01\x01"), Err(BtfError::BadMagic { .. })));
    }

    #[test]
    fn truncated_prefixes_are_errors() {
        let raw = fixture_bytes(V5_10);
        let n = raw.len();
        for cut in [0, 1, 2, 3, 4, 12, 23, 24, 25, 36, 1000, n / 3, n / 2, n - 2, n - 1] {
            let e = Btf::from_bytes(&raw[..cut]).expect_err("truncated blob parsed");
            assert!(e.to_string().contains("truncated"), "cut {cut}: {e}");
        }
    }

    #[test]
    fn cut_type_section_does_not_panic() {
        // Shrink type_len in the header so the section ends inside or between records, then
        // use what is left: references past the end must be errors, never a panic.
        let raw = fixture_bytes(V5_10);
        let type_len = le32(&raw, 12);
        for cut in [1, 11, 12, 13, 100, 1001, 40_000, type_len / 2, type_len - 1] {
            let mut blob = raw.clone();
            blob[12..16].copy_from_slice(&cut.to_le_bytes());
            if let Ok(btf) = Btf::from_bytes(&blob) {
                let _ = btf.member("sk_buff.dev");
                let _ = btf.enum_value("sk_state", "TCP_LISTEN");
                let _ = btf.func_proto_params("btf_trace_kfree_skb");
            }
        }
    }

    #[test]
    fn parse_is_fast_enough() {
        // The real budget (well under 200 ms) is for release builds; see parse_time_release.
        let raw = fixture_bytes(V6_18);
        let start = std::time::Instant::now();
        Btf::from_bytes(&raw).unwrap();
        assert!(start.elapsed().as_secs() < 5, "parse took {:?}", start.elapsed());
    }

    /// `cargo test --release --lib -- --ignored --nocapture parse_time`
    #[test]
    #[ignore = "timing; meaningful in release builds only"]
    fn parse_time_release() {
        for name in [V6_18, V6_1, V5_10] {
            let raw = fixture_bytes(name);
            let mut best = std::time::Duration::MAX;
            for _ in 0..10 {
                let start = std::time::Instant::now();
                let btf = Btf::from_bytes(&raw).unwrap();
                best = best.min(start.elapsed());
                std::hint::black_box(btf);
            }
            println!("{name}: {} bytes, best of 10 parses {best:?}", raw.len());
        }
    }

    /// Writes small BTF blobs for the cases the fixtures do not pin down.
    #[derive(Default)]
    struct Builder {
        types: Vec<u8>,
        strs: Vec<u8>,
        count: u32,
    }

    const KIND_FLAG: u32 = 1 << 31;

    impl Builder {
        fn str(&mut self, s: &str) -> u32 {
            if self.strs.is_empty() {
                self.strs.push(0); // offset 0 is the empty name
            }
            if s.is_empty() {
                return 0;
            }
            let off = self.strs.len() as u32;
            self.strs.extend_from_slice(s.as_bytes());
            self.strs.push(0);
            off
        }

        /// Appends a type: `kind | KIND_FLAG`, size or type, trailing words. Returns its id.
        fn add(&mut self, name: &str, kind: u32, vlen: u32, size_or_type: u32, extra: &[u32]) -> u32 {
            let name_off = self.str(name);
            let info = ((kind & 0x1f) << 24) | (kind & KIND_FLAG) | vlen;
            for word in [name_off, info, size_or_type].iter().chain(extra) {
                self.types.extend_from_slice(&word.to_le_bytes());
            }
            self.count += 1;
            self.count
        }

        fn build(&mut self) -> Vec<u8> {
            self.str("");
            let (type_len, str_len) = (self.types.len() as u32, self.strs.len() as u32);
            let mut blob = vec![0x9f, 0xeb, 1, 0];
            for word in [HEADER_LEN, 0, type_len, type_len, str_len] {
                blob.extend_from_slice(&word.to_le_bytes());
            }
            blob.extend_from_slice(&self.types);
            blob.extend_from_slice(&self.strs);
            blob
        }
    }

    /// A blob with every kind, a `kind_flag` bitfield struct, nested anonymous members,
    /// name clashes and a typedef cycle.
    fn synthetic() -> Vec<u8> {
        let mut b = Builder::default();
        let int = b.add("int", 1, 0, 4, &[32]);
        let ushort = b.add("unsigned short", 1, 0, 2, &[16]);
        let void_ptr = b.add("", 2, 0, 0, &[]);
        let (a, bf, c) = (b.str("a"), b.str("bf"), b.str("c"));
        #[rustfmt::skip]
        let inner = b.add("inner", 4 | KIND_FLAG, 3, 8, &[
            a, int, 0,
            bf, int, (3 << 24) | 32, // 3-bit field at bit 32
            c, ushort, 48,
        ]);
        let const_inner = b.add("", 10, 0, inner, &[]);
        let inner_t = b.add("inner_t", 8, 0, const_inner, &[]);
        let (x, y) = (b.str("x"), b.str("y"));
        let anon_union = b.add("", 5, 2, 8, &[x, int, 0, y, void_ptr, 0]);
        let int2 = b.add("", 3, 0, 0, &[int, int, 2]);
        let var = b.add("v", 14, 0, int, &[1]);
        b.add(".data", 15, 1, 4, &[var, 0, 4]);
        let float = b.add("double", 16, 0, 8, &[]);
        let tagged = b.add("user", 18, 0, int, &[]);
        // Lower ids with the same name: a forward declaration and an empty duplicate.
        b.add("outer", 7, 0, 0, &[]);
        b.add("outer", 4, 0, 0, &[]);
        let (first, inn, arr, f) = (b.str("first"), b.str("in"), b.str("arr"), b.str("f"));
        #[rustfmt::skip]
        let outer = b.add("outer", 4, 5, 40, &[
            first, int, 0,
            0, anon_union, 64,
            inn, inner_t, 128,
            arr, int2, 192,
            f, float, 256,
        ]);
        b.add("tag", 17, 0, outer, &[u32::MAX]);
        let (red, blue) = (b.str("RED"), b.str("BLUE"));
        b.add("color", 6 | KIND_FLAG, 2, 4, &[red, -1i32 as u32, blue, 2]);
        let big = b.str("BIG");
        b.add("uenum", 6, 1, 4, &[big, 0xffff_fff0]);
        let huge = b.str("HUGE");
        b.add("big", 19 | KIND_FLAG, 1, 8, &[huge, 2, 1]);
        let restrict_ptr = b.add("", 11, 0, void_ptr, &[]);
        let const_ptr = b.add("", 10, 0, void_ptr, &[]);
        let ptr_ptr = b.add("", 2, 0, void_ptr, &[]);
        let volatile_int = b.add("", 9, 0, int, &[]);
        let p = b.str("p");
        #[rustfmt::skip]
        let proto = b.add("", 13, 7, int, &[
            p, void_ptr, 0, restrict_ptr, 0, tagged, 0, const_ptr, 0, ptr_ptr, 0, volatile_int,
            0, 0, // `...`
        ]);
        let proto_ptr = b.add("", 2, 0, proto, &[]);
        b.add("btf_trace_x", 8, 0, proto_ptr, &[]);
        b.add("f", 12, 0, proto, &[]);
        let fp = b.str("fp");
        b.add("has_fp", 4, 1, 8, &[fp, proto_ptr, 0]);
        // typedef loop_a -> loop_b -> loop_a
        let loop_a = b.count + 1;
        b.add("loop_a", 8, 0, loop_a + 1, &[]);
        b.add("loop_b", 8, 0, loop_a, &[]);
        let m = b.str("m");
        b.add("looped", 4, 1, 4, &[m, loop_a, 0]);
        b.build()
    }

    #[test]
    fn synthetic_members() {
        let btf = Btf::from_bytes(&synthetic()).unwrap();
        assert_eq!(member(&btf, "outer.first"), (0, 4));
        // Through the anonymous union.
        assert_eq!(member(&btf, "outer.x"), (8, 4));
        assert_eq!(member(&btf, "outer.y"), (8, 8));
        // Through typedef + const into a kind_flag struct: offsets are the low 24 bits.
        assert_eq!(member(&btf, "outer.in.a"), (16, 4));
        assert_eq!(member(&btf, "outer.in.c"), (22, 2));
        assert_eq!(member(&btf, "outer.arr"), (24, 8));
        assert_eq!(member(&btf, "outer.f"), (32, 8));
        assert_eq!(member(&btf, "inner_t.c"), (6, 2));
        assert!(matches!(btf.member("outer.in.bf"), Err(BtfError::Bitfield { .. })));
        assert_eq!(err(btf.member("outer.in.zz")), "inner_t has no member `zz`");
        assert!(matches!(btf.member("looped.m"), Err(BtfError::TooDeep { .. })));
    }

    #[test]
    fn synthetic_enums_and_prototypes() {
        let btf = Btf::from_bytes(&synthetic()).unwrap();
        assert_eq!(btf.enum_value("color", "RED").unwrap(), -1);
        assert_eq!(btf.enum_value("color", "BLUE").unwrap(), 2);
        assert_eq!(btf.enum_value("uenum", "BIG").unwrap(), 0xffff_fff0);
        assert_eq!(btf.enum_value("big", "HUGE").unwrap(), 0x1_0000_0002);
        assert_eq!(
            btf.func_proto_params("btf_trace_x").unwrap(),
            ["void *", "void * restrict", "int", "void * const", "void **", "volatile int", "..."]
        );
        let fp = btf.composite_by_name("has_fp").unwrap().members().next().unwrap().ty;
        assert_eq!(
            btf.render(fp),
            "int (*)(void *, void * restrict, int, void * const, void **, volatile int, ...)"
        );
        assert!(matches!(btf.func_proto_params("loop_a"), Err(BtfError::TooDeep { .. })));
    }

    /// A prototype whose parameter is a pointer to itself: rendering stops at the depth bound
    /// (it used to restart the depth count at every parameter and overflow the stack).
    #[test]
    fn prototype_cycles_are_bounded() {
        let mut b = Builder::default();
        // 1: func_proto(p, p) where 2: p, a ptr -> 1; 3: typedef cyc -> 2; 4: int. Two
        // parameters make the rendering branch at each level.
        b.add("", 13, 2, 4, &[0, 2, 0, 2]);
        b.add("", 2, 0, 1, &[]);
        b.add("cyc", 8, 0, 2, &[]);
        b.add("int", 1, 0, 4, &[32]);
        let btf = Btf::from_bytes(&b.build()).unwrap();
        let params = btf.func_proto_params("cyc").unwrap();
        assert_eq!(params.len(), 2);
        assert!(params[0].contains("<too "), "{}", params[0]);
        assert!(params.concat().len() < RENDER_BUDGET * 32, "{} bytes", params.concat().len());
    }

    #[test]
    fn unknown_kind_and_corruption() {
        let mut b = Builder::default();
        b.add("x", 31, 0, 0, &[]);
        assert_eq!(err(Btf::from_bytes(&b.build())), "BTF type 1 has unknown kind 31");

        // Every prefix, and every byte set to a few values: parse and look up, never panic.
        let good = synthetic();
        for cut in 0..good.len() {
            assert!(Btf::from_bytes(&good[..cut]).is_err(), "prefix of {cut} bytes parsed");
        }
        for i in 0..good.len() {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut blob = good.clone();
                blob[i] = value;
                if let Ok(btf) = Btf::from_bytes(&blob) {
                    let _ = btf.member("outer.in.c");
                    let _ = btf.member("outer.y");
                    let _ = btf.enum_value("big", "HUGE");
                    let _ = btf.func_proto_params("btf_trace_x");
                }
            }
        }
    }
}
