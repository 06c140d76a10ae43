//! Pre-tokenization: split text into regex pieces ("chunks") and count the unique ones.
//!
//! The default (GPT-4 style, nanochat digits) pattern needs a lookahead, `\s+(?!\S)`, which only a
//! backtracking engine runs. `Splitter` runs it with the `regex` crate's automata instead: the
//! pattern without that alternative, plus one fix-up that gives exactly the lookahead's result (see
//! `Splitter::pieces`). Any other pattern goes through `fancy-regex` unchanged.
//!
//! With the default pattern one big string is split on several threads: it is cut at positions
//! where the sequential scan is known to end a piece (right after `\n` when a non-space ASCII byte
//! follows; see `safe_cuts`), so the pieces are exactly those of one sequential pass. A custom
//! pattern gives no such guarantee, so its texts are never cut.

use ahash::AHashMap;
use rayon::prelude::*;
use regex_automata::{meta, Anchored, Input};

pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The default pattern for the `regex` crate: possessive quantifiers made greedy (equivalent here:
/// giving back a char can never let the rest of those alternatives match) and `\s+(?!\S)` dropped.
const DEFAULT_PATTERN_AUTOMATA: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+";

/// Segments smaller than this are not cut further: thread overhead would dominate.
const MIN_SEGMENT: usize = 1 << 16;

pub enum Splitter {
    Automata(meta::Regex),
    Backtracking(fancy_regex::Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        if pattern == DEFAULT_PATTERN {
            let re = meta::Regex::new(DEFAULT_PATTERN_AUTOMATA).map_err(|e| e.to_string())?;
            return Ok(Splitter::Automata(re));
        }
        let re = fancy_regex::Regex::new(pattern).map_err(|e| e.to_string())?;
        Ok(Splitter::Backtracking(re))
    }

    /// `text` cut into about `parts` segments that split into exactly the pieces of `text`.
    pub fn segments<'t>(&self, text: &'t str, parts: usize) -> Vec<&'t str> {
        match self {
            Splitter::Automata(_) => safe_cuts(text, parts).windows(2).map(|w| &text[w[0]..w[1]]).collect(),
            Splitter::Backtracking(_) => vec![text],
        }
    }

    /// Call `f` on every piece of `text`, in order.
    pub fn pieces<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self {
            Splitter::Backtracking(re) => {
                for m in re.find_iter(text) {
                    f(m.map_err(|e| format!("regex failed: {e}"))?.as_str());
                }
            }
            Splitter::Automata(re) => {
                // Every char is a letter, a number, a space or none of these, so a piece starts
                // wherever the last one ended: an anchored forward search finds it without the
                // reverse scan an unanchored one needs for the start. `search` takes a warm cache
                // from the regex's pool: a fresh one per text would rebuild the lazy DFA each time.
                let mut input = Input::new(text).anchored(Anchored::Yes);
                let mut pos = 0;
                while pos < text.len() {
                    input.set_start(pos);
                    let m = re
                        .search(&input)
                        .ok_or_else(|| format!("no piece starts at byte {pos} of the text"))?;
                    let mut end = m.end();
                    if is_lookahead_trim(&text[pos..end], &text[end..]) {
                        end -= text[pos..end].chars().next_back().map_or(0, char::len_utf8);
                    }
                    f(&text[pos..end]);
                    pos = end;
                }
            }
        }
        Ok(())
    }
}

/// Whether `\s+(?!\S)` would have matched `piece` minus its last char, where the automata matched
/// `piece` with `\s+` and `rest` follows. Only `\s+` and `\s*[\r\n]` give a piece that ends in
/// a space, and the latter ends in `\r` or `\n`; a run of two or more chars that a non-space
/// follows gives its last char to the next piece.
fn is_lookahead_trim(piece: &str, rest: &str) -> bool {
    let mut chars = piece.chars().rev();
    let ends_in_plain_space = chars.next().is_some_and(|c| c.is_whitespace() && c != '\r' && c != '\n');
    let longer_than_one = chars.next().is_some();
    let next_is_nonspace = rest.chars().next().is_some_and(|c| !c.is_whitespace());
    ends_in_plain_space && longer_than_one && next_is_nonspace
}

/// Cut points that split `text` into roughly `parts` segments, each ending a piece of the
/// sequential scan: just after a `\n` that a non-space char follows. No match can run from the
/// `\n` into that char (every alternative that takes `\n` ends with it or with more `\r\n`, and
/// whitespace runs stop at a non-space), and no alternative looks behind, so the pieces on either
/// side are the same as in one pass. "Space" is Unicode White_Space, as `\s` means: `\x0b` after
/// the `\n` could continue a `\s*[\r\n]` run.
pub fn safe_cuts(text: &str, parts: usize) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut cuts = vec![0];
    if parts > 1 && bytes.len() >= 2 * MIN_SEGMENT {
        let step = (bytes.len() / parts).max(MIN_SEGMENT);
        let mut target = step;
        while target < bytes.len() {
            let found = bytes[target..]
                .iter()
                .enumerate()
                .filter(|&(_, &b)| b == b'\n')
                .map(|(offset, _)| target + offset + 1)
                .find(|&cut| text[cut..].chars().next().is_some_and(|c| !c.is_whitespace()));
            match found {
                Some(cut) => {
                    cuts.push(cut);
                    target = cut + step;
                }
                None => break,
            }
        }
    }
    cuts.push(bytes.len());
    cuts.dedup();
    cuts
}

/// Add the pieces of many texts (each text split on its own, big ones cut into segments) to
/// `total`, counting in parallel; the result does not depend on the number of threads.
pub fn count_pieces(splitter: &Splitter, texts: &[String], total: &mut AHashMap<String, i64>) -> Result<(), String> {
    let parts = rayon::current_num_threads() * 4;
    let segments: Vec<&str> = texts.iter().flat_map(|t| splitter.segments(t, parts)).collect();
    // One map per rayon job rather than per segment: a buffer of small documents would otherwise
    // allocate and merge thousands of tiny maps.
    let partials = segments
        .par_iter()
        .try_fold(AHashMap::<&str, i64>::new, |mut counts, segment| {
            splitter.pieces(segment, |piece| *counts.entry(piece).or_insert(0) += 1)?;
            Ok::<_, String>(counts)
        })
        .collect::<Result<Vec<_>, String>>()?;
    for partial in partials {
        for (piece, n) in partial {
            match total.get_mut(piece) {
                Some(c) => *c += n,
                None => {
                    total.insert(piece.to_owned(), n);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_with(splitter: &Splitter, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        splitter.pieces(text, |p| out.push(p.to_owned())).unwrap();
        out
    }

    /// The pattern as written, lookahead and all, run by the backtracking engine.
    fn reference(text: &str) -> Vec<String> {
        static RE: std::sync::OnceLock<fancy_regex::Regex> = std::sync::OnceLock::new();
        let re = RE.get_or_init(|| fancy_regex::Regex::new(DEFAULT_PATTERN).unwrap());
        re.find_iter(text).map(|m| m.unwrap().as_str().to_owned()).collect()
    }

    const TRICKY: &[&str] = &[
        "Hello world",
        "   leading spaces and trailing   ",
        "tabs\t\tbefore\tword",
        "a  \n  b\r\n\r\nc",
        "x   5 and  12345678",
        "don't I'LL we've THEY'RE",
        "emoji 🙂🙂 and 日本語 text",
        "\u{a0}\u{a0}nbsp\u{2003}em space",
        "   ",
        "end with newline \n",
        "punct!!!\n\nnext... ))\n",
        " \t \nX",
    ];

    #[test]
    fn automata_splitter_equals_the_lookahead_regex() {
        let fast = Splitter::new(DEFAULT_PATTERN).unwrap();
        assert!(matches!(fast, Splitter::Automata(_)));
        for text in TRICKY {
            assert_eq!(split_with(&fast, text), reference(text), "text {text:?}");
        }
    }

    /// Texts drawn from chars that exercise every alternative and class edge (Unicode spaces,
    /// `\r`, the case-folded `ſ` for `'s`, letters and numbers outside ASCII), by a fixed LCG.
    fn random_texts(count: usize, max_len: usize) -> Vec<String> {
        let alphabet: Vec<char> = "aZé日1٣½ \t\n\r\u{a0}\u{2003}\u{b}'sSſlLvVeErRdmt.!-🙂\u{301}".chars().collect();
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: usize| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as usize) % n
        };
        (0..count)
            .map(|_| {
                let len = next(max_len + 1);
                (0..len).map(|_| alphabet[next(alphabet.len())]).collect()
            })
            .collect()
    }

    #[test]
    fn automata_splitter_equals_the_lookahead_regex_on_random_text() {
        let fast = Splitter::new(DEFAULT_PATTERN).unwrap();
        for text in random_texts(5000, 30) {
            assert_eq!(split_with(&fast, &text), reference(&text), "text {text:?}");
        }
    }

    #[test]
    fn cut_random_text_gives_the_same_pieces_as_one_pass() {
        // Lines that start with any char of the alphabet: spaces, `\x0b`, `\r`, letters, marks.
        let text: String = random_texts(40_000, 12).join("\n");
        let splitter = Splitter::new(DEFAULT_PATTERN).unwrap();
        let segments = splitter.segments(&text, 16);
        assert!(segments.len() > 3, "a big text should be cut");
        let pieces: Vec<String> = segments.iter().flat_map(|s| split_with(&splitter, s)).collect();
        assert_eq!(pieces, reference(&text));
    }

    #[test]
    fn cuts_never_split_a_space_run_that_ends_in_a_newline() {
        // `\n\x0b\n` is one `\s*[\r\n]` piece: the `\n` before `\x0b` is no place to cut.
        let text = "word\n\x0b\n".repeat(50_000);
        let splitter = Splitter::new(DEFAULT_PATTERN).unwrap();
        let segments = splitter.segments(&text, 8);
        assert!(segments.len() > 3, "a big text should be cut");
        let pieces: Vec<String> = segments.iter().flat_map(|s| split_with(&splitter, s)).collect();
        assert_eq!(pieces, reference(&text));
    }

    #[test]
    fn count_pieces_counts_every_piece_of_every_text() {
        let mut texts = random_texts(2000, 30);
        texts.push("a line, and\n  another one 42\n".repeat(10_000));
        let mut total = AHashMap::new();
        count_pieces(&Splitter::new(DEFAULT_PATTERN).unwrap(), &texts, &mut total).unwrap();
        let mut expected: AHashMap<String, i64> = AHashMap::new();
        for text in &texts {
            for piece in reference(text) {
                *expected.entry(piece).or_insert(0) += 1;
            }
        }
        assert_eq!(total, expected);
    }

    #[test]
    fn pieces_tile_the_text() {
        let fast = Splitter::new(DEFAULT_PATTERN).unwrap();
        for text in TRICKY {
            assert_eq!(split_with(&fast, text).concat(), *text);
        }
    }

    #[test]
    fn cut_segments_give_the_same_counts_as_one_pass() {
        let mut text = String::new();
        for i in 0..20_000 {
            text.push_str(&format!("line {i} of text,  with   spaces\n\t indented {i}\n\nX{i}\n"));
        }
        let cuts = safe_cuts(&text, 8);
        assert!(cuts.len() > 3, "a big text should be cut: {cuts:?}");
        let splitter = Splitter::new(DEFAULT_PATTERN).unwrap();
        let mut pieces = Vec::new();
        for w in cuts.windows(2) {
            pieces.extend(split_with(&splitter, &text[w[0]..w[1]]));
        }
        assert_eq!(pieces, reference(&text));
    }

    #[test]
    fn custom_patterns_are_never_cut() {
        // `[^a]+` runs across newlines: cutting after one would change the pieces.
        let splitter = Splitter::new("[^a]+|a").unwrap();
        let text = "x\ny\n".repeat(100_000);
        assert_eq!(splitter.segments(&text, 8), vec![text.as_str()]);
    }

    #[test]
    fn broken_pattern_is_an_error() {
        assert!(Splitter::new("(unclosed").is_err());
    }
}
