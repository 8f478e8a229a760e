//! Paged answers (Discover, ListAgents, ListWorkers): each page is bounded by
//! a count and by its encoded size, so it stays well under the 4 MiB that
//! gRPC clients accept by default, and says where the next page starts.

/// Most bytes of items in one answer.
pub const MAX_PAGE_BYTES: usize = 1 << 20;

/// How many items to put in a page: `asked`, or `max` when `asked` is 0 or
/// more than `max`.
pub fn size(asked: u32, max: u32) -> usize {
    (if asked == 0 { max } else { asked.min(max) }) as usize
}

/// How many of `items` fit in one answer of at most [`MAX_PAGE_BYTES`]
/// (at least one, however large).
pub fn fit<M: prost::Message>(items: &[M]) -> usize {
    let mut bytes = 0;
    let over = items.iter().position(|item| {
        bytes += item.encoded_len() + 4; // with the field's tag and length
        bytes > MAX_PAGE_BYTES
    });
    over.map_or(items.len(), |over| over.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_bounded_by_count_and_bytes() {
        assert_eq!(size(0, 10_000), 10_000);
        assert_eq!(size(25, 10_000), 25);
        assert_eq!(size(50_000, 10_000), 10_000);
        let small = vec![String::from("x"); 10];
        assert_eq!(fit(&small), 10);
        let large = vec!["y".repeat(400_000); 5];
        assert_eq!(fit(&large), 2);
        assert_eq!(fit(&["z".repeat(3 << 20)]), 1);
    }
}
