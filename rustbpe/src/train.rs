//! BPE training on counted chunks: merge the most frequent adjacent pair until the vocabulary is
//! full, keeping pair counts incrementally instead of recounting.
//!
//! State: each unique chunk is a `Word` (its token ids) with its count; `pair_counts` holds every
//! adjacent pair's total count; `where_pair` maps a pair to the words that may contain it; a
//! max-heap holds one entry per pair whose stored count is an upper bound of the true count
//! (counts of old pairs only fall). Popping an entry whose count is stale re-pushes it with the
//! true count (lazy re-validation); an up-to-date top is the true maximum. Ties go to the smallest
//! pair (first id, then second id), so training is deterministic.

use ahash::{AHashMap, AHashSet};
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

pub type Pair = (u32, u32);

#[derive(Clone, Debug)]
pub struct Word {
    pub ids: Vec<u32>,
}

impl Word {
    fn pairs(&self) -> impl Iterator<Item = Pair> + '_ {
        self.ids.windows(2).map(|w| (w[0], w[1]))
    }

    /// Replace every non-overlapping (left to right) occurrence of `pair` by `new_id`, telling
    /// `delta` each neighbouring pair that goes (-1) or comes (+1). Changes to `pair` itself are
    /// reported too, but meaningless: the caller drops its count whole.
    fn merge(&mut self, pair: Pair, new_id: u32, mut delta: impl FnMut(Pair, i64)) {
        let old = std::mem::take(&mut self.ids);
        let mut out = Vec::with_capacity(old.len());
        let mut i = 0;
        while i < old.len() {
            if i + 1 < old.len() && (old[i], old[i + 1]) == pair {
                // The left neighbour is read from `out`: after an occurrence just merged it is
                // `new_id`, and (new_id, a) cancels the +1 that occurrence gave its right side.
                if let Some(&left) = out.last() {
                    delta((left, pair.0), -1);
                    delta((left, new_id), 1);
                }
                if let Some(&right) = old.get(i + 2) {
                    delta((pair.1, right), -1);
                    delta((new_id, right), 1);
                }
                out.push(new_id);
                i += 2;
            } else {
                out.push(old[i]);
                i += 1;
            }
        }
        self.ids = out;
    }
}

#[derive(Eq, PartialEq)]
struct Entry {
    count: i64,
    pair: Pair,
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap on count; on equal counts the smaller pair must come out first.
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Learn `num_merges` merges from chunks with counts. Returns the merges in order: merge `k`
/// joins the pair into the new id `256 + k`.
pub fn train(chunks: Vec<(Vec<u8>, i64)>, num_merges: usize) -> Vec<Pair> {
    let (mut words, counts): (Vec<Word>, Vec<i64>) = chunks
        .into_iter()
        .map(|(bytes, n)| (Word { ids: bytes.into_iter().map(u32::from).collect() }, n))
        .unzip();

    let (mut pair_counts, mut where_pair) = count_pairs(&words, &counts);
    let mut heap: BinaryHeap<Entry> = pair_counts
        .iter()
        .filter(|(_, &c)| c > 0)
        .map(|(&pair, &count)| Entry { count, pair })
        .collect();

    let mut merges = Vec::new();
    while merges.len() < num_merges {
        let Some(top) = heap.pop() else { break };
        let current = pair_counts.get(&top.pair).copied().unwrap_or(0);
        if current <= 0 {
            continue;
        }
        if current != top.count {
            heap.push(Entry { count: current, pair: top.pair });
            continue;
        }
        let new_id = 256 + merges.len() as u32;
        merges.push(top.pair);

        // Only the pairs around each occurrence change, and only pairs with `new_id` can grow.
        let mut touched: AHashSet<Pair> = AHashSet::new();
        let mut word_ids: Vec<usize> = where_pair.remove(&top.pair).unwrap_or_default().into_iter().collect();
        word_ids.sort_unstable();
        for w in word_ids {
            if !words[w].pairs().any(|p| p == top.pair) {
                continue;
            }
            let n = counts[w];
            words[w].merge(top.pair, new_id, |p, d| {
                *pair_counts.entry(p).or_insert(0) += d * n;
                if d > 0 {
                    where_pair.entry(p).or_default().insert(w);
                    touched.insert(p);
                }
            });
        }
        pair_counts.remove(&top.pair);
        let mut fresh: Vec<Pair> = touched.into_iter().collect();
        fresh.sort_unstable();
        for pair in fresh {
            let count = pair_counts[&pair];
            if count > 0 {
                heap.push(Entry { count, pair });
            }
        }
    }
    merges
}

type PairIndex = (AHashMap<Pair, i64>, AHashMap<Pair, AHashSet<usize>>);

fn count_pairs(words: &[Word], counts: &[i64]) -> PairIndex {
    words
        .par_iter()
        .enumerate()
        .fold(
            || (AHashMap::new(), AHashMap::new()),
            |(mut pc, mut wp): PairIndex, (i, word)| {
                for pair in word.pairs() {
                    *pc.entry(pair).or_insert(0) += counts[i];
                    wp.entry(pair).or_insert_with(AHashSet::new).insert(i);
                }
                (pc, wp)
            },
        )
        .reduce(
            || (AHashMap::new(), AHashMap::new()),
            |(mut pc, mut wp), (pc2, wp2)| {
                for (k, v) in pc2 {
                    *pc.entry(k).or_insert(0) += v;
                }
                for (k, v) in wp2 {
                    wp.entry(k).or_insert_with(AHashSet::new).extend(v);
                }
                (pc, wp)
            },
        )
}

/// The bytes of every token id: the 256 single bytes, then each merge's concatenation.
pub fn token_bytes(merges: &[Pair]) -> Vec<Vec<u8>> {
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(a, b) in merges {
        let mut bytes = vocab[a as usize].clone();
        bytes.extend_from_slice(&vocab[b as usize]);
        vocab.push(bytes);
    }
    vocab
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recount everything from scratch each step: slow and obviously right.
    fn naive(chunks: &[(&str, i64)], num_merges: usize) -> Vec<Pair> {
        let mut words: Vec<(Vec<u32>, i64)> =
            chunks.iter().map(|(s, n)| (s.bytes().map(u32::from).collect(), *n)).collect();
        let mut merges = Vec::new();
        for k in 0..num_merges {
            let mut counts: std::collections::BTreeMap<Pair, i64> = Default::default();
            for (ids, n) in &words {
                for w in ids.windows(2) {
                    *counts.entry((w[0], w[1])).or_insert(0) += n;
                }
            }
            let Some(best) = counts.iter().map(|(&p, &c)| (c, std::cmp::Reverse(p))).max() else {
                break;
            };
            let pair = best.1 .0;
            let new_id = 256 + k as u32;
            for (ids, _) in words.iter_mut() {
                let mut out = Vec::new();
                let mut i = 0;
                while i < ids.len() {
                    if i + 1 < ids.len() && (ids[i], ids[i + 1]) == pair {
                        out.push(new_id);
                        i += 2;
                    } else {
                        out.push(ids[i]);
                        i += 1;
                    }
                }
                *ids = out;
            }
            merges.push(pair);
        }
        merges
    }

    fn run(chunks: &[(&str, i64)], n: usize) -> Vec<Pair> {
        train(chunks.iter().map(|(s, c)| (s.as_bytes().to_vec(), *c)).collect(), n)
    }

    #[test]
    fn equals_naive_recount_on_overlapping_runs() {
        let chunks = [("aaaa", 3), ("aaaaa", 2), ("abab", 5), ("ababab", 1), (" aa", 4), ("ba", 7)];
        assert_eq!(run(&chunks, 12), naive(&chunks, 12));
    }

    #[test]
    fn equals_naive_recount_on_words() {
        let text = "the quick brown fox jumps over the lazy dog and the other dog sees the fox";
        let mut counts: std::collections::BTreeMap<&str, i64> = Default::default();
        for w in text.split(' ') {
            *counts.entry(w).or_insert(0) += 1;
        }
        let chunks: Vec<(&str, i64)> = counts.into_iter().collect();
        assert_eq!(run(&chunks, 40), naive(&chunks, 40));
    }

    #[test]
    fn equals_naive_recount_on_random_words() {
        // Few symbols make long runs and many ties: overlapping and adjacent occurrences abound.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let words: Vec<(String, i64)> = (0..300)
            .map(|_| {
                let len = 1 + next(12);
                let word: String = (0..len).map(|_| ['a', 'b', 'c'][next(3) as usize]).collect();
                (word, 1 + next(5) as i64)
            })
            .collect();
        let chunks: Vec<(&str, i64)> = words.iter().map(|(w, n)| (w.as_str(), *n)).collect();
        assert_eq!(run(&chunks, 80), naive(&chunks, 80));
    }

    #[test]
    fn ties_break_to_the_smallest_pair() {
        // "ba" and "ab" and "cd" all occur twice: (a, b) = (97, 98) is the smallest.
        let merges = run(&[("ab", 2), ("cd", 2), ("ba", 2)], 1);
        assert_eq!(merges, vec![(97, 98)]);
    }

    #[test]
    fn stops_when_no_pair_is_left() {
        assert_eq!(run(&[("ab", 1)], 5), vec![(97, 98)]);
    }

    #[test]
    fn token_bytes_concatenate_merges() {
        let vocab = token_bytes(&[(97, 98), (256, 99)]);
        assert_eq!(vocab[257], b"abc".to_vec());
    }
}
