//! Encoding with mergeable ranks, the way tiktoken does it, so both give the same ids: split with
//! the pattern, then inside each piece repeatedly join the adjacent parts whose concatenated bytes
//! have the lowest rank (leftmost on ties) until no concatenation is a token.

use ahash::AHashMap;
use rayon::prelude::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::pretok::Splitter;

pub struct Encoder {
    ranks: AHashMap<Vec<u8>, u32>,
}

impl Encoder {
    pub fn new(vocab: &[Vec<u8>]) -> Encoder {
        let ranks = vocab.iter().enumerate().map(|(id, b)| (b.clone(), id as u32)).collect();
        Encoder { ranks }
    }

    /// Encode `text`; a big one is cut into segments (see `Splitter::segments`) encoded in parallel.
    pub fn encode(&self, splitter: &Splitter, text: &str) -> Result<Vec<u32>, String> {
        let segments = splitter.segments(text, rayon::current_num_threads() * 4);
        if segments.len() == 1 {
            return self.encode_segment(splitter, text);
        }
        let parts = segments
            .par_iter()
            .map(|segment| self.encode_segment(splitter, segment))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(parts.concat())
    }

    fn encode_segment(&self, splitter: &Splitter, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 3);
        splitter.pieces(text, |piece| self.encode_piece(piece.as_bytes(), &mut out))?;
        Ok(out)
    }

    fn rank(&self, bytes: &[u8]) -> Option<u32> {
        self.ranks.get(bytes).copied()
    }

    fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        if let Some(id) = self.rank(piece) {
            out.push(id);
            return;
        }
        // Parts form a linked list over byte offsets: the part starting at `s` ends at `next[s]`.
        // A min-heap of (rank, left start) picks the lowest rank, leftmost on ties, as tiktoken's
        // scan does, but in O(n log n), so a 100 KB word stays fast. Stale entries are skipped.
        let n = piece.len();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Reverse<(u32, usize, usize)>>, s: usize, next: &[usize]| {
            let mid = next[s];
            if mid < n {
                let end = next[mid];
                if let Some(r) = self.rank(&piece[s..end]) {
                    heap.push(Reverse((r, s, end)));
                }
            }
        };
        for s in 0..n {
            push(&mut heap, s, &next);
        }
        while let Some(Reverse((_, s, end))) = heap.pop() {
            let mid = next[s];
            if !alive[s] || mid >= n || next[mid] != end {
                continue;
            }
            alive[mid] = false;
            next[s] = end;
            if end < n {
                prev[end] = s;
            }
            push(&mut heap, s, &next);
            if prev[s] != usize::MAX {
                push(&mut heap, prev[s], &next);
            }
        }
        let mut s = 0;
        while s < n {
            out.push(self.rank(&piece[s..next[s]]).expect("every part is a token"));
            s = next[s];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretok::DEFAULT_PATTERN;
    use crate::train::token_bytes;

    #[test]
    fn joins_the_lowest_rank_first() {
        // 256 = "bc", 257 = "ab": "abc" must become [a, bc], not [ab, c].
        let encoder = Encoder::new(&token_bytes(&[(98, 99), (97, 98)]));
        let splitter = Splitter::new(DEFAULT_PATTERN).unwrap();
        assert_eq!(encoder.encode(&splitter, "abc").unwrap(), vec![97, 256]);
        assert_eq!(encoder.encode(&splitter, "ab").unwrap(), vec![257]);
    }

    #[test]
    fn bytes_only_vocab_gives_utf8_bytes() {
        let encoder = Encoder::new(&token_bytes(&[]));
        let splitter = Splitter::new(DEFAULT_PATTERN).unwrap();
        let text = "héllo 🙂";
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(encoder.encode(&splitter, text).unwrap(), ids);
    }
}
