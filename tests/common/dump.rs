//! `DUMP` payloads of account keys taken apart and put together again with a valid CRC64, so
//! a test can `RESTORE` a state of its own making (a fuzzed one, or one an older build wrote).

/// Redis's CRC64 (Jones polynomial, reflected, as in the `DUMP` trailer and the RDB file).
pub fn crc64(bytes: &[u8]) -> u64 {
    const POLY: u64 = 0x95ac_9329_ac4b_c9b5;
    let mut crc = 0u64;
    for &b in bytes {
        crc ^= u64::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Replaces the last 8 bytes (the CRC64 trailer of a `DUMP` payload or an RDB file) with the
/// CRC64 of everything before them.
pub fn fix_crc(bytes: &mut [u8]) {
    let body = bytes.len().saturating_sub(8);
    let crc = crc64(&bytes[..body]).to_le_bytes();
    bytes[body..].copy_from_slice(&crc);
}

/// An RDB length: 6, 14 or 32 bits.
pub fn rdb_len(out: &mut Vec<u8>, n: usize) {
    match n {
        0..=63 => out.push(n as u8),
        64..=16383 => out.extend_from_slice(&[0x40 | (n >> 8) as u8, n as u8]),
        _ => {
            out.push(0x80);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
}

/// An uncompressed `DUMP` payload of an account key, split into the type and module id, the
/// module's string (the encoded account) and the RDB version.
pub struct Dump {
    pub head: Vec<u8>,
    pub state: Vec<u8>,
    pub version: [u8; 2],
}

impl Dump {
    /// Splits `type(1) module-id(9) opcode(1) length string EOF(1) version(2) crc(8)`.
    pub fn split(payload: &[u8]) -> Dump {
        assert!(payload.len() > 22 && payload[0] == 7, "{payload:?}");
        let head = payload[..11].to_vec();
        let (len, skip) = match payload[11] >> 6 {
            0 => (usize::from(payload[11] & 0x3f), 1),
            1 => (
                usize::from(payload[11] & 0x3f) << 8 | usize::from(payload[12]),
                2,
            ),
            _ => (
                u32::from_be_bytes([payload[12], payload[13], payload[14], payload[15]]) as usize,
                5,
            ),
        };
        let start = 11 + skip;
        let state = payload[start..start + len].to_vec();
        let n = payload.len();
        Dump {
            head,
            state,
            version: [payload[n - 10], payload[n - 9]],
        }
    }

    /// The payload holding `state` (its length written as `len`), with a valid CRC.
    pub fn frame(&self, state: &[u8], len: usize) -> Vec<u8> {
        let mut out = self.head.clone();
        rdb_len(&mut out, len);
        out.extend_from_slice(state);
        out.push(0);
        out.extend_from_slice(&self.version);
        out.extend_from_slice(&[0; 8]);
        fix_crc(&mut out);
        out
    }
}

/// An account state as the module encodes it, built by hand: what an older build, a long
/// PostgreSQL outage or a crafted payload may hold.
pub mod state {
    /// A varint (7 bits a byte, low first).
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// A signed number, zigzag-encoded.
    pub fn signed(out: &mut Vec<u8>, v: i64) {
        varint(out, ((v << 1) ^ (v >> 63)) as u64);
    }

    /// A state with no lease, the hour counter in `hour` (hours since 1970), and the ledger
    /// part: `next_seq` and the unflushed `hours` as (hour, requests, tokens).
    pub fn with_hours(hour: i64, next_seq: u64, hours: &[(i64, i64, i64)]) -> Vec<u8> {
        let mut out = vec![2, 0];
        // ReqDay, ReqMonth, TokHour, TokDay, TokMonth: (window, count).
        for window in [0, 0, hour, 0, 0] {
            signed(&mut out, window);
            varint(&mut out, 0);
        }
        varint(&mut out, 0); // lifetime total
        varint(&mut out, 0); // leases
        varint(&mut out, 0); // settled ids
        varint(&mut out, next_seq);
        varint(&mut out, 0); // floor
        varint(&mut out, 0);
        varint(&mut out, hours.len() as u64);
        for &(h, requests, tokens) in hours {
            for v in [h, requests, tokens, 0, 0] {
                signed(&mut out, v);
            }
        }
        varint(&mut out, 0); // holds
        out.push(0); // no terms
        out
    }
}
