//! Lease ids: the generated 16-hex-digit ids kept inline as a number, any other id as text.

/// A lease id: the 16-hex-digit ids the module generates are kept inline as a number, any
/// other id a caller chose is kept as text. Both compare and print as the text the caller sees.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum LeaseId {
    Short(u64),
    Named(Box<str>),
}

impl LeaseId {
    /// The id for `text` (exactly 16 lower-case hex digits become `Short`).
    pub(crate) fn parse(text: &str) -> LeaseId {
        match LeaseId::short_form(text) {
            Some(n) => LeaseId::Short(n),
            None => LeaseId::Named(text.into()),
        }
    }

    /// The number a 16-lower-case-hex-digit id stands for; none for any other text.
    pub(crate) fn short_form(text: &str) -> Option<u64> {
        let is_short =
            text.len() == 16 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        is_short
            .then(|| u64::from_str_radix(text, 16).ok())
            .flatten()
    }

    /// Writes the text form into `buf` and returns it (no allocation for generated ids).
    pub(crate) fn as_text<'b>(&'b self, buf: &'b mut [u8; 16]) -> &'b str {
        match self {
            LeaseId::Short(n) => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                for (i, out) in buf.iter_mut().enumerate() {
                    *out = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
                }
                std::str::from_utf8(buf).unwrap_or("")
            }
            LeaseId::Named(s) => s,
        }
    }

    pub(super) fn heap_size(&self) -> usize {
        match self {
            LeaseId::Short(_) => 0,
            LeaseId::Named(s) => s.len(),
        }
    }
}
