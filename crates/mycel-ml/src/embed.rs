//! Sentence embeddings from BERT-family models: mean pooling over the attention mask, then L2
//! normalisation (what sentence-transformers does for all-MiniLM-L6-v2).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config;
use tokenizers::Tokenizer;

use crate::bert::Bert;

use crate::files::{model_id, model_name};
use crate::{ContentId, MlError, Result};

/// The files an embedding model is loaded from (and hashed into its id).
pub const EMBEDDER_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// Texts run through the model at once.
pub const BATCH: usize = 32;

/// The most texts of requests embedded together in one run (see [`Embedder::embed_together`]).
pub const TOGETHER: usize = 8 * BATCH;

/// A loaded embedding model.
pub struct Embedder {
    model: Bert,
    tokenizer: Tokenizer,
    id: ContentId,
    name: String,
    dimension: usize,
    max_tokens: usize,
    /// Requests waiting to be embedded together, and whether a caller is running a batch.
    together: Mutex<Together>,
    /// Told when a run ends.
    ran: Condvar,
    /// Runs of [`Embedder::embed_together`]'s callers.
    runs: AtomicU64,
}

/// What [`Embedder::embed`] gives: the vectors and the tokens read.
pub type Embedded = Result<(Vec<Vec<f32>>, usize)>;

#[derive(Default)]
struct Together {
    waiting: Vec<Arc<Job>>,
    running: bool,
}

/// One caller's texts, whether it still waits for them, and its result once a run has made
/// it.
struct Job {
    texts: Vec<String>,
    stop: Arc<AtomicBool>,
    result: Mutex<Option<Embedded>>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("dimension", &self.dimension)
            .finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads the model in `dir` (config.json, model.safetensors, tokenizer.json).
    pub fn load(dir: &Path) -> Result<Self> {
        for file in EMBEDDER_FILES {
            if !dir.join(file).is_file() {
                return Err(MlError::model(
                    dir,
                    format!("no {file}: an embedding model directory holds {EMBEDDER_FILES:?}"),
                ));
            }
        }
        let config_path = dir.join("config.json");
        let config_text =
            std::fs::read_to_string(&config_path).map_err(|e| MlError::model(&config_path, e))?;
        let config: Config = serde_json::from_str(&config_text)
            .map_err(|e| MlError::model(&config_path, format!("not a BERT config: {e}")))?;
        let max_tokens: usize = serde_json::from_str::<serde_json::Value>(&config_text)
            .ok()
            .and_then(|v| v["max_position_embeddings"].as_u64())
            .unwrap_or(512) as usize;

        let device = Device::Cpu;
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is memory-mapped read-only; it must not be truncated while loaded,
        // which holds for files in a node's model directory.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device) }
            .map_err(|e| MlError::model(&weights, e))?;
        let model = Bert::load(vb, &config).map_err(|e| MlError::model(&weights, e))?;

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| MlError::model(&tokenizer_path, e))?;
        // The shipped tokenizer pads every input to 128 tokens: the model runs on the real
        // tokens only, so no padding; and never truncate silently (too long is the caller's
        // error).
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| MlError::model(&tokenizer_path, e))?;

        Ok(Self {
            model,
            tokenizer,
            id: model_id(dir, &EMBEDDER_FILES)?,
            name: model_name(dir),
            dimension: config.hidden_size,
            max_tokens,
            together: Mutex::default(),
            ran: Condvar::new(),
            runs: AtomicU64::new(0),
        })
    }

    /// The model's content id.
    pub fn id(&self) -> ContentId {
        self.id
    }

    /// The model's name (its directory's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Length of each embedding.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Most tokens one input may have.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Embeds `texts` (unit-length vectors, in order), in batches of [`BATCH`]; returns them
    /// with the number of tokens the inputs held.
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Embedded {
        let (vectors, counts) = self.embed_counted(texts)?;
        Ok((vectors, counts.iter().sum()))
    }

    /// [`Embedder::embed`], with the tokens of each text.
    fn embed_counted<S: AsRef<str>>(&self, texts: &[S]) -> Result<(Vec<Vec<f32>>, Vec<usize>)> {
        if texts.is_empty() {
            return Err(MlError::Input("the input list is empty".into()));
        }
        let order = by_length(texts);
        let mut out = vec![Vec::new(); texts.len()];
        let mut counts = vec![0; texts.len()];
        for batch in order.chunks(BATCH) {
            let (vectors, tokens) = self.embed_batch(texts, batch)?;
            for ((&i, vector), n) in batch.iter().zip(vectors).zip(tokens) {
                out[i] = vector;
                counts[i] = n;
            }
        }
        Ok((out, counts))
    }

    /// [`Embedder::embed`] for callers at once: the texts of requests that arrive while one
    /// runs are embedded together in the next run (up to [`TOGETHER`] texts), by one of
    /// their callers, so that small requests share the model's products. Each text's vector
    /// is the one it gets alone (a sentence's rows never mix with another's, and the products'
    /// sums are cut the same way however many rows they have), and a request whose input is
    /// refused fails alone. A caller that sets `stop` before its turn is not run
    /// ([`MlError::Stopped`]). The caller that runs a batch holds what `turn` gives (the
    /// cores, say) while it runs. Returns the result and how long the request waited for its
    /// run, in milliseconds.
    pub fn embed_together<G>(
        &self,
        texts: Vec<String>,
        stop: &Arc<AtomicBool>,
        turn: impl Fn() -> G,
    ) -> (Embedded, f64) {
        let queued = Instant::now();
        if texts.is_empty() {
            return (Err(MlError::Input("the input list is empty".into())), 0.0);
        }
        let job = Arc::new(Job {
            texts,
            stop: stop.clone(),
            result: Mutex::new(None),
        });
        let lock = || self.together.lock().unwrap_or_else(|e| e.into_inner());
        let mut state = lock();
        state.waiting.push(job.clone());
        let mut waited = None;
        loop {
            if let Some(result) = job.result.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let waited = waited.unwrap_or_else(|| queued.elapsed().as_secs_f64() * 1e3);
                return (result, waited);
            }
            if state.running {
                state = self.ran.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // This caller runs the waiting requests (its own among them, or first in line);
            // those whose callers stopped waiting are dropped unrun.
            state.running = true;
            let mut batch = Vec::new();
            let mut texts = 0;
            while let Some(next) = state.waiting.first() {
                if !batch.is_empty() && texts + next.texts.len() > TOGETHER {
                    break;
                }
                let next = state.waiting.remove(0);
                if next.stop.load(Ordering::Relaxed) {
                    *next.result.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Err(MlError::Stopped));
                    continue;
                }
                texts += next.texts.len();
                batch.push(next);
            }
            drop(state);
            if batch.iter().any(|j| Arc::ptr_eq(j, &job)) {
                waited = Some(queued.elapsed().as_secs_f64() * 1e3);
            }
            if !batch.is_empty() {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let _turn = turn();
                    self.runs.fetch_add(1, Ordering::Relaxed);
                    self.run_together(&batch);
                }));
                if ran.is_err() {
                    for job in &batch {
                        let mut result = job.result.lock().unwrap_or_else(|e| e.into_inner());
                        if result.is_none() {
                            *result = Some(Err(MlError::Run("the embedding run failed".into())));
                        }
                    }
                }
            }
            state = lock();
            state.running = false;
            self.ran.notify_all();
        }
    }

    /// Runs of [`Embedder::embed_together`] so far (requests embedded together share one).
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Requests waiting for a run of [`Embedder::embed_together`].
    pub fn waiting(&self) -> usize {
        self.together
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting
            .len()
    }

    /// Embeds the texts of `jobs` in one run and hands each its result. A panic fails only
    /// the requests that panic alone.
    fn run_together(&self, jobs: &[Arc<Job>]) {
        let set = |job: &Job, result: Embedded| {
            *job.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        };
        let requests: Vec<&[String]> = jobs.iter().map(|j| j.texts.as_slice()).collect();
        let run =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.embed_many(&requests)));
        match run {
            Ok(results) => {
                for (job, result) in jobs.iter().zip(results) {
                    set(job, result);
                }
            }
            Err(_) => {
                for job in jobs {
                    let alone = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.embed(&job.texts)
                    }));
                    let result = alone.unwrap_or_else(|_| {
                        Err(MlError::Run("embedding this input panicked".into()))
                    });
                    set(job, result);
                }
            }
        }
    }

    /// Embeds the texts of several requests in one run: each gets what [`Embedder::embed`]
    /// gives it alone (its vectors, the same bits, and its tokens). When the run is refused
    /// (some input is), the requests whose inputs are refused alone fail with that, and the
    /// others run together again.
    pub fn embed_many<S: AsRef<str>>(&self, requests: &[&[S]]) -> Vec<Embedded> {
        let together = |requests: &[&[S]]| -> Result<Vec<Embedded>> {
            let all: Vec<&str> = requests
                .iter()
                .flat_map(|r| r.iter().map(AsRef::as_ref))
                .collect();
            let (mut vectors, counts) = self.embed_counted(&all)?;
            let mut at = 0;
            Ok(requests
                .iter()
                .map(|r| {
                    let n = r.len();
                    let own: Vec<Vec<f32>> = vectors.drain(..n).collect();
                    let tokens = counts[at..at + n].iter().sum();
                    at += n;
                    Ok((own, tokens))
                })
                .collect())
        };
        if requests.iter().all(|r| !r.is_empty()) {
            if let Ok(results) = together(requests) {
                return results;
            }
        }
        // Which are refused alone: tokenizing is a small part of a run.
        let refused: Vec<Option<MlError>> = requests.iter().map(|r| self.refuses(r)).collect();
        let fine: Vec<&[S]> = requests
            .iter()
            .zip(&refused)
            .filter(|(_, e)| e.is_none())
            .map(|(r, _)| *r)
            .collect();
        let mut fine_results = match together(&fine) {
            Ok(results) => results,
            Err(_) => fine.iter().map(|r| self.embed(r)).collect(),
        }
        .into_iter();
        refused
            .into_iter()
            .map(|e| match e {
                Some(e) => Err(e),
                None => fine_results
                    .next()
                    .expect("a result per request not refused"),
            })
            .collect()
    }

    /// Why [`Embedder::embed`] would refuse `texts` before running the model, if it would.
    fn refuses<S: AsRef<str>>(&self, texts: &[S]) -> Option<MlError> {
        if texts.is_empty() {
            return Some(MlError::Input("the input list is empty".into()));
        }
        by_length(texts)
            .chunks(BATCH)
            .find_map(|batch| self.encode_batch(texts, batch).err())
    }

    /// Embeds `texts[i]` for each `i` in `batch`.
    fn embed_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        batch: &[usize],
    ) -> Result<(Vec<Vec<f32>>, Vec<usize>)> {
        let (encodings, tokens) = self.encode_batch(texts, batch)?;
        let ids: Vec<&[u32]> = encodings.iter().map(|e| e.get_ids()).collect();
        let mut vectors = self.model.mean_pooled(&ids)?;
        // Unit length.
        for v in &mut vectors {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
        Ok((vectors, tokens))
    }

    /// Tokenizes `texts[i]` for each `i` in `batch`, refusing one too long: the encodings
    /// and each one's tokens.
    fn encode_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        batch: &[usize],
    ) -> Result<(Vec<tokenizers::Encoding>, Vec<usize>)> {
        let inputs: Vec<&str> = batch.iter().map(|&i| texts[i].as_ref()).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| MlError::Input(format!("cannot tokenize the input: {e}")))?;
        let mut tokens = Vec::with_capacity(encodings.len());
        for (i, encoding) in encodings.iter().enumerate() {
            let len = encoding
                .get_attention_mask()
                .iter()
                .filter(|m| **m == 1)
                .count();
            if len > self.max_tokens {
                return Err(MlError::Input(format!(
                    "input {} has {len} tokens; {} takes at most {}",
                    batch[i], self.name, self.max_tokens
                )));
            }
            tokens.push(len);
        }
        Ok((encodings, tokens))
    }
}

/// The indices of `texts`, longest first: batches of similar lengths pad less (as
/// sentence-transformers does), and the vectors go back in the caller's order.
fn by_length<S: AsRef<str>>(texts: &[S]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(texts[i].as_ref().len()));
    order
}

/// The engine name of the f32 models (this encoder, and `--engine exact` generation), e.g.
/// `candle-f32-avx512-kc512`. Their products run on gemm, and two things decide the order in
/// which gemm sums, and so the last bits of every output: its kernel (AVX-512, FMA or
/// portable, chosen at run time from the CPU's features) and how it blocks the summed
/// dimension (`kc`, from the size and associativity of the L1 data cache it reads from the
/// system: an AVX2 CPU with a 48 KiB 12-way L1 blocks by 1,024 where one with 32 KiB 8-way
/// blocks by 512, and a product over more than 512 sums in another order). The name holds
/// both, so that replicas are only asked of peers whose engine gives the same bits, and an
/// honest peer on another kind of CPU is never outvoted as a liar for its last bits. The
/// thread count is not part of it: gemm splits rows and columns among threads, never the
/// sum (a test checks the bits across thread counts).
pub fn f32_engine() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| match gemm_kernel() {
        Some((kernel, mr, nr)) => {
            // The block gemm uses for a long sum decides it for every length: a sum of k is
            // cut into ceil(k / block) equal parts (k itself when k <= 512).
            let k = 1 << 20;
            let block = gemm_common::cache::kernel_params(4096, 4096, k, mr, nr, 4).kc;
            format!("candle-f32-{kernel}-kc{block}")
        }
        // Not measured here: named by architecture alone.
        None => format!("candle-f32-{}", std::env::consts::ARCH),
    })
}

/// The f32 kernel gemm picks on this CPU, as gemm-common 0.19's dispatch does, with its
/// register block (rows, columns); `None` off x86-64.
fn gemm_kernel() -> Option<(&'static str, usize, usize)> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Some(("avx512", 4 * 16, 6));
        }
        if is_x86_feature_detected!("fma") {
            return Some(("fma", 2 * 8, 6));
        }
        Some(("portable", 2, 4))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}
