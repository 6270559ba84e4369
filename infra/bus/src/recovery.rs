//! Damage in the embedded log's segments: finding it, stepping over it, keeping a copy.
//!
//! A frame carries its own offset and a CRC over everything after the CRC, so damage (a
//! flipped bit, a zeroed block, a torn write) is a byte range where no valid frame starts.
//! [`scan`] walks a segment frame by frame and, at a frame that does not decode, searches
//! forward for the next position where one does ([`resync`]): every valid record after the
//! damage is kept, only the damaged bytes are lost. A candidate must pass cheap checks
//! before its CRC is computed (a length that fits, an offset above the last good one and
//! no further ahead than the remaining bytes could hold, a key that fits the frame), so a
//! search costs about one pass over the bytes, and a false resync needs a random CRC-32 to
//! match on top of those checks.
//!
//! Damaged bytes are never silently dropped: [`quarantine`] copies them to
//! `<partition>/quarantine/<segment base>-<byte>.bin`, once, with a warning naming the
//! segment, the byte range and the offsets around it, and counts them in
//! `digame_bus_quarantined_bytes_total{topic, partition}`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::frame::{BODY_FIXED, FRAME_HEADER, decode_frame};
use super::{BusError, Result, Topic};
use digame_telemetry::metrics;

/// The smallest frame: header and fixed body, empty key and payload.
const MIN_FRAME: usize = FRAME_HEADER + BODY_FIXED;

/// What a scan of one segment found.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Scan {
    /// End of the last valid frame: everything after it is a torn or damaged tail.
    pub valid_end: usize,
    /// One past the last valid frame's offset (`base` when there is none).
    pub next_offset: u64,
    /// Damaged ranges before `valid_end`, each followed by a valid frame.
    pub damaged: Vec<Range<usize>>,
    /// The offsets of the records lost in those ranges: those missing between the valid
    /// frames around each.
    pub lost: Vec<Range<u64>>,
    /// Valid records.
    pub records: u64,
}

/// The frame starting at `data[pos..]` if it is valid and its offset is at least `min`:
/// its offset and size.
fn frame_at(data: &[u8], pos: usize, min: u64) -> Option<(u64, usize)> {
    let rest = data.get(pos..)?;
    if rest.len() < MIN_FRAME {
        return None;
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    if len < BODY_FIXED || FRAME_HEADER + len > rest.len() {
        return None;
    }
    let offset = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
    // Records lost between `min` and this one took at least a minimal frame each.
    if offset < min || offset - min > (data.len() / MIN_FRAME) as u64 {
        return None;
    }
    let klen = u32::from_le_bytes(rest[24..28].try_into().expect("4 bytes")) as usize;
    if BODY_FIXED + klen > len {
        return None;
    }
    match decode_frame(rest) {
        Some(Ok((offset, _, _, _, size))) => Some((offset, size)),
        _ => None,
    }
}

/// The first position at or after `from` where a valid frame with an offset of at least
/// `min` starts.
pub(super) fn resync(data: &[u8], from: usize, min: u64) -> Option<usize> {
    (from..data.len().saturating_sub(MIN_FRAME - 1)).find(|&p| frame_at(data, p, min).is_some())
}

/// Walks a segment whose first offset is at least `base`. Offsets must rise (a gap is
/// fine: records lost to earlier damage leave one).
pub(super) fn scan(data: &[u8], base: u64) -> Scan {
    let mut pos = 0;
    let mut next = base;
    let mut valid_end = 0;
    let mut damaged = Vec::new();
    let mut records = 0;
    let mut lost = Vec::new();
    while pos < data.len() {
        match frame_at(data, pos, next) {
            Some((offset, size)) => {
                records += 1;
                pos += size;
                next = offset + 1;
                valid_end = pos;
            }
            None => match resync(data, pos + 1, next) {
                Some(p) => {
                    damaged.push(pos..p);
                    let (resumes, _) = frame_at(data, p, next).expect("resync found a frame");
                    lost.push(next..resumes);
                    pos = p;
                }
                None => break,
            },
        }
    }
    Scan {
        valid_end,
        next_offset: next,
        damaged,
        lost,
        records,
    }
}

/// Where a damaged range of the segment at `base` is kept.
fn quarantine_path(partition_dir: &Path, base: u64, start: u64) -> PathBuf {
    partition_dir
        .join("quarantine")
        .join(format!("{base:020}-{start:012}.bin"))
}

/// One partition of one topic, and its directory.
#[derive(Clone, Copy)]
pub(super) struct Place<'a> {
    pub topic: Topic,
    pub partition: u32,
    pub dir: &'a Path,
}

/// Keeps a copy of `bytes` (damaged, from byte `start` of the segment at `base`) unless
/// one was kept already; warns and counts the first time, and then answers true. `resumes_at` is the offset of
/// the first record kept after the damage (`None`: the damage runs to the end).
pub(super) fn quarantine(
    place: Place<'_>,
    base: u64,
    start: u64,
    bytes: &[u8],
    resumes_at: Option<u64>,
    what: &str,
) -> Result<bool> {
    let Place {
        topic,
        partition,
        dir: partition_dir,
    } = place;
    let path = quarantine_path(partition_dir, base, start);
    let dir = path.parent().expect("quarantine dir");
    fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io(&path, e)),
    };
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io(&path, e))?;
    tracing::warn!(
        topic = topic.name(),
        partition,
        segment = base,
        bytes = format!("{start}..{}", start + bytes.len() as u64),
        resumes_at_offset = ?resumes_at,
        kept = %path.display(),
        "{what}: damaged bytes in the bus log quarantined; the records after them are kept"
    );
    metrics()
        .bus_quarantined_bytes
        .with_label_values(&[topic.name(), &partition.to_string()])
        .inc_by(bytes.len() as u64);
    Ok(true)
}

fn io(path: &Path, source: std::io::Error) -> BusError {
    BusError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;
    use crate::frame::encode_frame;
    use bytes::Bytes;

    /// Frames with offsets `offsets`, and where each starts.
    fn segment(offsets: &[u64]) -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut starts = Vec::new();
        for &o in offsets {
            starts.push(buf.len());
            let rec = Record {
                key: Bytes::from(format!("user-{o}")),
                payload: Bytes::from(format!("{{\"n\": {o}, \"pad\": \"{}\"}}", "x".repeat(40))),
                timestamp_ms: 1_700_000_000_000 + o as i64,
            };
            encode_frame(&mut buf, o, &rec);
        }
        (buf, starts)
    }

    #[test]
    fn a_clean_segment_scans_whole() {
        let (data, _) = segment(&[10, 11, 12, 13]);
        assert_eq!(
            scan(&data, 10),
            Scan {
                valid_end: data.len(),
                next_offset: 14,
                damaged: vec![],
                lost: vec![],
                records: 4
            }
        );
    }

    #[test]
    fn a_flipped_byte_loses_one_record_and_keeps_the_rest() {
        let offsets: Vec<u64> = (0..50).collect();
        let (clean, starts) = segment(&offsets);
        // Every byte of frame 20 in turn: the length, the CRC, the offset, the payload.
        for at in starts[20]..starts[21] {
            let mut data = clean.clone();
            data[at] ^= 0x40;
            let s = scan(&data, 0);
            assert_eq!(s.next_offset, 50, "byte {at}");
            assert_eq!(s.valid_end, data.len(), "byte {at}");
            assert_eq!(s.damaged, vec![starts[20]..starts[21]], "byte {at}");
            assert_eq!(s.lost, vec![20..21], "byte {at}");
        }
    }

    #[test]
    fn a_zeroed_block_across_frames_is_one_damaged_range() {
        let offsets: Vec<u64> = (100..160).collect();
        let (mut data, starts) = segment(&offsets);
        // From the middle of frame 5 to the middle of frame 9: frames 5–9 are lost.
        let (from, to) = (starts[5] + 7, starts[9] + 30);
        data[from..to].fill(0);
        let s = scan(&data, 100);
        assert_eq!(s.damaged, vec![starts[5]..starts[10]]);
        assert_eq!(s.lost, vec![105..110]);
        assert_eq!(s.next_offset, 160);
    }

    #[test]
    fn a_torn_tail_is_not_damage_and_gaps_in_offsets_are_fine() {
        // 0, 1, 2, then 7, 8 (a gap left by records lost earlier), then half a frame.
        let (mut data, _) = segment(&[0, 1, 2, 7, 8]);
        let end = data.len();
        let (tail, _) = segment(&[9]);
        data.extend_from_slice(&tail[..tail.len() / 2]);
        let s = scan(&data, 0);
        assert_eq!(
            s,
            Scan {
                valid_end: end,
                next_offset: 9,
                damaged: vec![],
                lost: vec![],
                records: 5
            }
        );
    }

    #[test]
    fn damage_in_the_last_frame_leaves_a_tail() {
        let (mut data, starts) = segment(&[0, 1, 2, 3]);
        data[starts[3] + 20] ^= 1;
        let s = scan(&data, 0);
        assert_eq!((s.valid_end, s.next_offset), (starts[3], 3));
        assert!(s.damaged.is_empty());
    }

    #[test]
    fn quarantine_keeps_one_copy() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = b"damaged";
        let place = Place {
            topic: Topic::Events,
            partition: 3,
            dir: dir.path(),
        };
        let firsts: Vec<bool> = (0..2)
            .map(|_| quarantine(place, 40, 1234, bytes, Some(41), "test").unwrap())
            .collect();
        assert_eq!(firsts, [true, false]);
        let kept: Vec<_> = fs::read_dir(dir.path().join("quarantine"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(kept, ["00000000000000000040-000000001234.bin"]);
        assert_eq!(
            fs::read(quarantine_path(dir.path(), 40, 1234)).unwrap(),
            bytes
        );
    }
}
