/// A hybrid logical clock timestamp: physical milliseconds in the high 48 bits and a
/// logical counter in the low 16. It orders the changes of LastWriterWins: larger wins,
/// and equal timestamps fall back to the replica id, so every replica picks the same
/// winner from the two versions alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc(pub u64);

const LOGICAL_BITS: u32 = 16;

impl Hlc {
    /// The next timestamp for a local change, given the wall clock and the last
    /// timestamp this replica issued or saw. Strictly greater than `last`, so a clock
    /// that runs backwards cannot reorder a replica's own writes.
    pub fn next(last: Hlc, now_ms: u64) -> Hlc {
        let physical = now_ms.min(u64::MAX >> LOGICAL_BITS) << LOGICAL_BITS;
        if physical > last.0 {
            Hlc(physical)
        } else {
            Hlc(last.0.saturating_add(1))
        }
    }

    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }
}
