//! Pages: many items' records, or many index entries, under one key.
//!
//! A storage engine like sled pays per record written far more than per byte (measured
//! on this project's machine: about 7 µs for a 60-byte record, 0.2 µs per item when 64
//! of them share a record), so the store keeps item records and index entries in pages.
//!
//! Invariants:
//! - An item page holds the records of the ids in `[its key, the next page's key)`, in
//!   id order, each id once. The page keyed by the bare prefix (the *first page*) covers
//!   every id below the next one; it may be absent, then it holds nothing. Pages never
//!   move: a page that overflows keeps its key for its first part, and the other parts
//!   go under the id of their first entry; an emptied page other than the first is
//!   removed, and its range falls back to the page before it.
//! - An index page holds the entries `(tick ↦ item id)` of one replica whose ticks
//!   share a bucket (`tick / INDEX_BUCKET`), in tick order, each tick once.
//! - Both layouts are bincode's encoding of `Vec<(bytes, bytes)>` and `Vec<(u64, bytes)>`
//!   after a kind byte and a format byte, so they are read here without copying and
//!   any malformed page is a reason, never a panic.

/// The kind bytes of the two page records.
pub(crate) const KIND_ITEM_PAGE: u8 = b'G';
pub(crate) const KIND_INDEX_PAGE: u8 = b'J';
const PAGE_FORMAT: u8 = 1;

/// An item page splits beyond this many entries...
pub(crate) const PAGE_ENTRIES: usize = 64;
/// ...or beyond this many bytes, whichever comes first (a single larger item gets a
/// page of its own).
pub(crate) const PAGE_BYTES: usize = 32 * 1024;
/// Ticks per index page.
pub(crate) const INDEX_BUCKET: u64 = 64;

fn put_varint(out: &mut Vec<u8>, n: u64) {
    // bincode 2's standard varint.
    if n < 251 {
        out.push(n as u8);
    } else if n <= u64::from(u16::MAX) {
        out.push(0xFB);
        out.extend_from_slice(&(n as u16).to_le_bytes());
    } else if n <= u64::from(u32::MAX) {
        out.push(0xFC);
        out.extend_from_slice(&(n as u32).to_le_bytes());
    } else {
        out.push(0xFD);
        out.extend_from_slice(&n.to_le_bytes());
    }
}

/// A cursor over a page's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!(
                "page cut short: {n} bytes wanted, {} left",
                self.bytes.len()
            ));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let first = self.take(1)?[0];
        let fixed = |b: &[u8]| {
            let mut le = [0u8; 8];
            le[..b.len()].copy_from_slice(b);
            u64::from_le_bytes(le)
        };
        let (n, min) = match first {
            0..=250 => return Ok(u64::from(first)),
            0xFB => (fixed(self.take(2)?), 251),
            0xFC => (fixed(self.take(4)?), 1 << 16),
            0xFD => (fixed(self.take(8)?), 1 << 32),
            other => return Err(format!("invalid varint tag {other:#04x}")),
        };
        if n < min {
            return Err("varint not in its shortest form".into());
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| "length out of range".to_string())?;
        self.take(len)
    }
}

fn body(kind: u8, bytes: &[u8]) -> Result<(Reader<'_>, usize), String> {
    let rest = match bytes {
        [k, f, rest @ ..] if *k == kind && *f == PAGE_FORMAT => rest,
        [k, f, ..] if *k == kind => {
            return Err(format!(
                "page format {f}; this build reads format {PAGE_FORMAT}"
            ))
        }
        [k, ..] => return Err(format!("record kind {k:#04x}, expected {kind:#04x}")),
        [] => return Err("empty record".into()),
    };
    let mut reader = Reader { bytes: rest };
    let count = reader.varint()?;
    // Every entry takes at least two bytes, so a count beyond that is a lie.
    if count > rest.len() as u64 {
        return Err(format!(
            "page announces {count} entries in {} bytes",
            rest.len()
        ));
    }
    Ok((reader, count as usize))
}

/// An item page's entry as read: its id and its item record, borrowed from the page.
pub(crate) type ItemEntry<'a> = (&'a [u8], &'a [u8]);

/// The entries of an item page, checked to be in strictly increasing id order.
pub(crate) fn item_entries(bytes: &[u8]) -> Result<Vec<ItemEntry<'_>>, String> {
    let (mut reader, count) = body(KIND_ITEM_PAGE, bytes)?;
    let mut out: Vec<ItemEntry<'_>> = Vec::with_capacity(count);
    for _ in 0..count {
        let id = reader.bytes()?;
        let record = reader.bytes()?;
        if let Some((last, _)) = out.last() {
            if *last >= id {
                return Err("page entries out of order".into());
            }
        }
        out.push((id, record));
    }
    if !reader.bytes.is_empty() {
        return Err(format!("{} trailing bytes", reader.bytes.len()));
    }
    Ok(out)
}

/// The record of `id` in an item page, if the page holds it.
pub(crate) fn find_item<'a>(bytes: &'a [u8], id: &[u8]) -> Result<Option<&'a [u8]>, String> {
    let (mut reader, count) = body(KIND_ITEM_PAGE, bytes)?;
    let mut last: Option<&[u8]> = None;
    for _ in 0..count {
        let entry = reader.bytes()?;
        let record = reader.bytes()?;
        if last.is_some_and(|l| l >= entry) {
            return Err("page entries out of order".into());
        }
        match entry.cmp(id) {
            std::cmp::Ordering::Less => last = Some(entry),
            std::cmp::Ordering::Equal => return Ok(Some(record)),
            std::cmp::Ordering::Greater => return Ok(None),
        }
    }
    Ok(None)
}

/// Encodes an item page from entries in id order.
pub(crate) fn encode_item_page<'a>(
    entries: impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])>,
) -> Vec<u8> {
    let mut out = vec![KIND_ITEM_PAGE, PAGE_FORMAT];
    put_varint(&mut out, entries.len() as u64);
    for (id, record) in entries {
        put_varint(&mut out, id.len() as u64);
        out.extend_from_slice(id);
        put_varint(&mut out, record.len() as u64);
        out.extend_from_slice(record);
    }
    out
}

/// Cuts a page's entries (in id order) into parts within the page bounds, of about
/// equal size: a page that overflows by one entry becomes two half-full pages, and a
/// commit that adds a thousand entries to one page writes full ones.
pub(crate) fn split_points(sizes: &[usize]) -> Vec<usize> {
    let total: usize = sizes.iter().sum();
    let parts = sizes
        .len()
        .div_ceil(PAGE_ENTRIES)
        .max(total.div_ceil(PAGE_BYTES))
        .max(1);
    let per_part = sizes.len().div_ceil(parts);
    let mut starts = vec![0];
    let (mut entries, mut bytes) = (0, 0);
    for (i, size) in sizes.iter().enumerate() {
        if entries > 0 && (entries >= per_part || bytes + size > PAGE_BYTES) {
            starts.push(i);
            entries = 0;
            bytes = 0;
        }
        entries += 1;
        bytes += size;
    }
    starts
}

/// The `(tick, item id)` entries of an index page, in strictly increasing tick order.
pub(crate) fn index_entries(bytes: &[u8]) -> Result<Vec<(u64, &[u8])>, String> {
    let (mut reader, count) = body(KIND_INDEX_PAGE, bytes)?;
    let mut out: Vec<(u64, &[u8])> = Vec::with_capacity(count);
    for _ in 0..count {
        let tick = reader.varint()?;
        let id = reader.bytes()?;
        if tick == 0 {
            return Err("index entry with tick 0".into());
        }
        if out.last().is_some_and(|(last, _)| *last >= tick) {
            return Err("index entries out of order".into());
        }
        out.push((tick, id));
    }
    if !reader.bytes.is_empty() {
        return Err(format!("{} trailing bytes", reader.bytes.len()));
    }
    Ok(out)
}

/// Encodes an index page from entries in tick order.
pub(crate) fn encode_index_page<'a>(
    entries: impl ExactSizeIterator<Item = (u64, &'a [u8])>,
) -> Vec<u8> {
    let mut out = vec![KIND_INDEX_PAGE, PAGE_FORMAT];
    put_varint(&mut out, entries.len() as u64);
    for (tick, id) in entries {
        put_varint(&mut out, tick);
        put_varint(&mut out, id.len() as u64);
        out.extend_from_slice(id);
    }
    out
}

/// Checks a page record of either kind (for `check_record`).
pub(crate) fn check_page(bytes: &[u8]) -> Result<(), String> {
    match bytes.first() {
        Some(&KIND_ITEM_PAGE) => {
            for (_, record) in item_entries(bytes)? {
                super::ItemMeta::decode_with_data(record)?;
            }
            Ok(())
        }
        Some(&KIND_INDEX_PAGE) => index_entries(bytes).map(drop),
        Some(k) => Err(format!("unknown record kind {k:#04x}")),
        None => Err("empty record".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_pages_round_trip_and_find_by_id() {
        let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..300u32)
            .map(|i| (format!("id{i:05}").into_bytes(), vec![i as u8; i as usize]))
            .collect();
        let page = encode_item_page(entries.iter().map(|(a, b)| (&a[..], &b[..])));
        let read = item_entries(&page).unwrap();
        assert_eq!(read.len(), 300);
        assert_eq!(read[299].1.len(), 299);
        assert_eq!(find_item(&page, b"id00007").unwrap(), Some(&[7u8; 7][..]));
        assert_eq!(find_item(&page, b"id00007x").unwrap(), None);
        assert_eq!(find_item(&page, b"zzz").unwrap(), None);
    }

    #[test]
    fn index_pages_round_trip_with_large_ticks() {
        let entries = [
            (1u64, &b"a"[..]),
            (300, b"b"),
            (70_000, b"c"),
            (1 << 40, b""),
        ];
        let page = encode_index_page(entries.iter().copied());
        assert_eq!(index_entries(&page).unwrap(), entries.to_vec());
    }

    #[test]
    fn malformed_pages_are_reasons_not_panics() {
        let page = encode_item_page([(&b"a"[..], &b"x"[..]), (b"b", b"y")].into_iter());
        for cut in 0..page.len() {
            assert!(item_entries(&page[..cut]).is_err(), "cut at {cut}");
        }
        let swapped = encode_item_page([(&b"b"[..], &b"x"[..]), (b"a", b"y")].into_iter());
        assert!(item_entries(&swapped).is_err());
        assert!(find_item(&swapped, b"c").is_err());
        let huge_count = [
            KIND_ITEM_PAGE,
            PAGE_FORMAT,
            0xFD,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            0,
            0,
            0,
        ];
        assert!(item_entries(&huge_count).is_err());
        let zero_tick = encode_index_page([(0u64, &b"a"[..])].into_iter());
        assert!(index_entries(&zero_tick).is_err());
    }

    #[test]
    fn splits_stay_within_the_bounds_and_fill_pages_evenly() {
        assert_eq!(split_points(&[10; 64]), vec![0]);
        assert_eq!(split_points(&[10; 65]), vec![0, 33]);
        let thousand = split_points(&[10; 1000]);
        assert_eq!(thousand.len(), 16);
        assert!(thousand
            .windows(2)
            .all(|w| w[1] - w[0] >= 62 && w[1] - w[0] <= 64));
        // A large item gets a page of its own; its small neighbours share theirs.
        let starts = split_points(&[100, 100, 40_000, 100, 100]);
        assert!(starts.contains(&2) && starts.contains(&3), "{starts:?}");
        assert_eq!(split_points(&[]), vec![0]);
    }
}
