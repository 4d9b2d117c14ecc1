//! The varints of the account encoding (`account::codec`) and of the replicated effects
//! (`effect`): LEB128, seven bits a byte, low bits first; signed numbers zigzagged first.

/// Why a varint could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VarintError {
    /// The bytes end inside it.
    Truncated,
    /// Its tenth byte holds more than the 64th bit.
    TooLarge,
    /// Ten bytes and it goes on.
    TooLong,
}

/// Takes one varint off the front of `buf`: its value, and whether it was written in its
/// shortest form (no last byte of zero after the first).
#[inline]
pub(crate) fn take_u64(buf: &mut &[u8]) -> Result<(u64, bool), VarintError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or(VarintError::Truncated)?;
        *buf = rest;
        let bits = u64::from(b & 0x7f);
        // The tenth byte holds the 64th bit only.
        if shift == 63 && bits > 1 {
            return Err(VarintError::TooLarge);
        }
        v |= bits << shift;
        if b & 0x80 == 0 {
            return Ok((v, b != 0 || shift == 0));
        }
    }
    Err(VarintError::TooLong)
}

/// Writes `v` as a varint through `push`, a byte at a time.
#[inline(always)]
pub(crate) fn write_u64(mut v: u64, mut push: impl FnMut(u8)) {
    while v >= 0x80 {
        push((v as u8) | 0x80);
        v >>= 7;
    }
    push(v as u8);
}

/// `v` as a varint: the bytes, and how many of them are used (at most 10).
#[inline]
pub(crate) fn encode_u64(v: u64) -> ([u8; 10], usize) {
    let mut out = [0u8; 10];
    let mut n = 0;
    write_u64(v, |b| {
        if let Some(slot) = out.get_mut(n) {
            *slot = b;
        }
        n += 1;
    });
    (out, n)
}

/// A signed number as the unsigned one its varint holds: 0, -1, 1, -2, ... as 0, 1, 2, 3, ...
#[inline]
pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// The inverse of `zigzag`.
#[inline]
pub(crate) fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(mut bytes: &[u8]) -> (Result<(u64, bool), VarintError>, usize) {
        let r = take_u64(&mut bytes);
        (r, bytes.len())
    }

    /// What `encode_u64` writes reads back, in its shortest form.
    #[test]
    fn encoded_numbers_read_back_in_their_shortest_form() {
        for v in [0, 1, 127, 128, 300, 1 << 35, u64::MAX - 1, u64::MAX] {
            let (buf, n) = encode_u64(v);
            assert_eq!(take(&buf[..n]), (Ok((v, true)), 0), "{v}");
        }
        assert_eq!(encode_u64(u64::MAX).1, 10);
    }

    #[test]
    fn reads_each_form_and_says_which_is_the_shortest() {
        assert_eq!(take(&[0]), (Ok((0, true)), 0));
        assert_eq!(take(&[0x7f, 9]), (Ok((127, true)), 1));
        assert_eq!(take(&[0x80, 0x01]), (Ok((128, true)), 0));
        // 1 padded to two bytes: the same value, not the shortest form.
        assert_eq!(take(&[0x81, 0x00]), (Ok((1, false)), 0));
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(take(&max), (Ok((u64::MAX, true)), 0));
    }

    #[test]
    fn refuses_what_no_u64_is() {
        assert_eq!(take(&[]).0, Err(VarintError::Truncated));
        assert_eq!(take(&[0x80]).0, Err(VarintError::Truncated));
        let large = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(take(&large).0, Err(VarintError::TooLarge));
        let long = [
            0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x81, 0x00,
        ];
        assert_eq!(take(&long).0, Err(VarintError::TooLong));
    }

    #[test]
    fn zigzag_round_trips() {
        for v in [0, -1, 1, -2, 2, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert_eq!([0, -1, 1, -2].map(zigzag), [0, 1, 2, 3]);
    }
}
