//! Kernel samples: the refusal records the eBPF side sends through its ring buffer (the first
//! of each key, then at most one per fold window; counts travel in the COUNTS map).
use aya::maps::{MapData, RingBuf};
use bindtrace_common::RefusalEvent;

/// Takes every record the ring holds now. Records shorter than a [`RefusalEvent`] (an object
/// of another version) are skipped.
pub(crate) fn drain(ring: &mut RingBuf<MapData>) -> Vec<RefusalEvent> {
    let mut samples = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<RefusalEvent>() {
            // SAFETY: RefusalEvent is Pod and the item is at least that long.
            samples.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RefusalEvent>()) });
        }
    }
    samples
}
