//! How one record of the embedded log is laid out on disk, shared by the writer, the
//! readers and the damage scan.
//!
//! `[len u32][crc32 u32][offset u64][timestamp i64][key_len u32][key][payload]`, little
//! endian; `len` counts everything after the CRC, and the CRC covers the same bytes, so a
//! frame proves its own integrity and names its own offset.

use super::Record;

/// Length and CRC.
pub(super) const FRAME_HEADER: usize = 8;
/// Offset, timestamp and key length: the body before the key.
pub(super) const BODY_FIXED: usize = 8 + 8 + 4;

/// A decoded frame: (offset, timestamp, key, payload, bytes the frame takes).
pub(super) type Frame<'a> = (u64, i64, &'a [u8], &'a [u8], usize);

/// Decodes one frame from the front of `buf`. `None`: incomplete; `Some(Err)`: corrupt.
pub(super) fn decode_frame(buf: &[u8]) -> Option<std::result::Result<Frame<'_>, String>> {
    if buf.len() < FRAME_HEADER {
        return None;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if len < BODY_FIXED {
        return Some(Err(format!("frame body of {len} bytes is too short")));
    }
    if buf.len() < FRAME_HEADER + len {
        return None;
    }
    let body = &buf[FRAME_HEADER..FRAME_HEADER + len];
    if crc32fast::hash(body) != crc {
        return Some(Err("CRC mismatch".into()));
    }
    let offset = u64::from_le_bytes(body[0..8].try_into().expect("8 bytes"));
    let ts = i64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let klen = u32::from_le_bytes(body[16..20].try_into().expect("4 bytes")) as usize;
    if BODY_FIXED + klen > len {
        return Some(Err("key length exceeds frame".into()));
    }
    let key = &body[BODY_FIXED..BODY_FIXED + klen];
    let payload = &body[BODY_FIXED + klen..];
    Some(Ok((offset, ts, key, payload, FRAME_HEADER + len)))
}

pub(super) fn encode_frame(buf: &mut Vec<u8>, offset: u64, rec: &Record) {
    let len = BODY_FIXED + rec.key.len() + rec.payload.len();
    let start = buf.len();
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&[0u8; 4]);
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&rec.timestamp_ms.to_le_bytes());
    buf.extend_from_slice(&(rec.key.len() as u32).to_le_bytes());
    buf.extend_from_slice(&rec.key);
    buf.extend_from_slice(&rec.payload);
    let crc = crc32fast::hash(&buf[start + FRAME_HEADER..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn frames_round_trip_and_detect_corruption() {
        let mut buf = Vec::new();
        let rec = Record {
            key: Bytes::from_static(b"key"),
            payload: Bytes::from_static(b"value"),
            timestamp_ms: 1,
        };
        encode_frame(&mut buf, 7, &rec);
        let (offset, ts, key, payload, size) = decode_frame(&buf).unwrap().unwrap();
        assert_eq!(
            (offset, ts, key, payload, size),
            (7, 1, &b"key"[..], &b"value"[..], buf.len())
        );
        assert!(decode_frame(&buf[..buf.len() - 1]).is_none());
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        assert!(decode_frame(&buf).unwrap().is_err());
    }
}
