//! `rustbpe`: train a byte-level BPE tokenizer fast and export it as tiktoken mergeable ranks.
//!
//! ```python
//! import rustbpe
//! tok = rustbpe.Tokenizer()
//! tok.train_from_iterator(iter(texts), vocab_size=4096)   # 4,096 ranks, the 256 bytes included
//! ranks = dict(tok.get_mergeable_ranks())                 # bytes -> rank, for tiktoken
//! tok.encode("hello world")                               # the same ids as tiktoken
//! ```
//! Text is pulled from the iterator in buffers under the GIL; splitting, counting, merging and
//! encoding run with the GIL released, on all cores (rayon; `RAYON_NUM_THREADS` caps them).

mod encode;
mod pretok;
mod train;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use rayon::prelude::*;

use encode::Encoder;
use pretok::{count_pieces, Splitter, DEFAULT_PATTERN};

struct Trained {
    pattern: String,
    splitter: Splitter,
    vocab: Vec<Vec<u8>>,
    encoder: Encoder,
}

#[pyclass(module = "rustbpe")]
struct Tokenizer {
    trained: Option<Trained>,
}

impl Tokenizer {
    fn trained(&self) -> PyResult<&Trained> {
        self.trained
            .as_ref()
            .ok_or_else(|| PyRuntimeError::new_err("this Tokenizer is not trained yet: call train_from_iterator first"))
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        Tokenizer { trained: None }
    }

    /// Train on the strings of `iterator` until there are `vocab_size` mergeable ranks (the 256
    /// single bytes included; fewer if the text runs out of pairs to merge). `pattern` defaults to
    /// the GPT-4 style split with 1-2 digit numbers. Equal counts go to the smallest pair.
    #[pyo3(signature = (iterator, vocab_size, buffer_size = 8192, pattern = None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (one rank per byte), got {vocab_size}"
            )));
        }
        if vocab_size > u32::MAX as i64 {
            return Err(PyValueError::new_err(format!("vocab_size must fit token ids in 32 bits, got {vocab_size}")));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!("buffer_size must be positive, got {buffer_size}")));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_owned());
        let splitter = Splitter::new(&pattern)
            .map_err(|e| PyValueError::new_err(format!("invalid split pattern {pattern:?}: {e}")))?;

        let mut items = iterator
            .try_iter()
            .map_err(|_| PyTypeError::new_err("train_from_iterator needs an iterable of str"))?;
        let mut counts: ahash::AHashMap<String, i64> = ahash::AHashMap::new();
        let mut buffer: Vec<String> = Vec::with_capacity((buffer_size as usize).min(1 << 16));
        let mut index = 0usize;
        loop {
            buffer.clear();
            for item in items.by_ref().take(buffer_size as usize) {
                let item = item?;
                let Ok(text) = item.cast::<PyString>() else {
                    return Err(PyTypeError::new_err(format!(
                        "item {index} of the iterator is {}, not str",
                        item.get_type().name().map(|n| n.to_string()).unwrap_or_default()
                    )));
                };
                let text: String = text.to_str().map(str::to_owned).map_err(|e| {
                    PyValueError::new_err(format!("item {index} of the iterator is not valid Unicode text: {e}"))
                })?;
                buffer.push(text);
                index += 1;
            }
            if buffer.is_empty() {
                break;
            }
            py.detach(|| count_pieces(&splitter, &buffer, &mut counts))
                .map_err(PyRuntimeError::new_err)?;
        }

        let vocab = py.detach(|| {
            let mut chunks: Vec<(Vec<u8>, i64)> = counts.into_iter().map(|(s, n)| (s.into_bytes(), n)).collect();
            chunks.sort_unstable();
            let merges = train::train(chunks, vocab_size as usize - 256);
            train::token_bytes(&merges)
        });
        let encoder = Encoder::new(&vocab);
        self.trained = Some(Trained { pattern, splitter, vocab, encoder });
        Ok(())
    }

    /// The split pattern used in training (and by `encode`).
    fn get_pattern(&self) -> PyResult<String> {
        Ok(self.trained()?.pattern.clone())
    }

    /// The mergeable ranks as a list of (token bytes, rank), ranks 0..vocab_size-1.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> PyResult<Vec<(Bound<'py, PyBytes>, u32)>> {
        let trained = self.trained()?;
        Ok(trained
            .vocab
            .iter()
            .enumerate()
            .map(|(rank, bytes)| (PyBytes::new(py, bytes), rank as u32))
            .collect())
    }

    /// Encode one text; the ids equal tiktoken's for the same ranks and pattern.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let trained = self.trained()?;
        py.detach(|| trained.encoder.encode(&trained.splitter, text))
            .map_err(PyRuntimeError::new_err)
    }

    /// Encode many texts in parallel.
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        let trained = self.trained()?;
        py.detach(|| {
            texts
                .par_iter()
                .map(|t| trained.encoder.encode(&trained.splitter, t))
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(PyRuntimeError::new_err)
    }
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    Ok(())
}
