//! Mycel's models, on candle: sentence embeddings from BERT-family models (safetensors and
//! tokenizer.json) and text generation from llama-family GGUF files (tokenizer and chat
//! template read from the GGUF metadata).
//!
//! Every model has a [`ContentId`]: BLAKE3 over the files it is loaded from (see
//! [`files::model_id`]), which is what nodes announce and what requests name.
//!
//! [`train`] trains small classifiers (logistic regression, MLPs) for federated jobs on data
//! [`data`] loads (CSV, NPY, the shipped scikit-learn digits, benchmark partitions).
//!
//! Nothing here knows about the network; `mycel-node` runs these models for local and remote
//! tasks. Models are plain structs with methods, as in candle.

#![warn(missing_docs, missing_debug_implementations)]

mod batch;
mod bert;
pub mod data;
mod dense;
pub mod embed;
pub mod files;
pub mod fixtures;
pub mod generate;
pub mod gguf_tokenizer;
pub mod hub;
mod llama;
mod logprobs;
mod pool;
pub mod qmatmul;
pub mod train;

pub use embed::Embedder;
pub use generate::{
    BatchLimits, BatchStats, ChatMessage, Engine, FinishReason, GenerateParams, Generation,
    Generator, Resume,
};
pub use mycel_core::id::ContentId;

/// What went wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum MlError {
    /// A model file is missing, unreadable or not what its name says.
    #[error("{path}: {reason}")]
    Model {
        /// The file or directory at fault.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The caller's input cannot be run (too long, empty, bad parameters): a 4xx for the API.
    #[error("{0}")]
    Input(String),
    /// The model failed while running.
    #[error("model error: {0}")]
    Run(String),
    /// Stopped before the end, as the caller asked (training for a round nobody waits for).
    #[error("stopped before the end")]
    Stopped,
}

impl MlError {
    pub(crate) fn model(path: &std::path::Path, reason: impl std::fmt::Display) -> Self {
        Self::Model {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// Fixes the thread count candle's CPU kernels use, once. Unless `RAYON_NUM_THREADS` is set,
/// candle works it out again on every matmul (reading `/proc/cpuinfo` and the CPU mask), which
/// doubled the time of small training steps. Sets the variable to candle's own choice (the
/// physical cores); call first thing in `main`, before any other thread exists.
pub fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

impl From<candle_core::Error> for MlError {
    fn from(e: candle_core::Error) -> Self {
        Self::Run(e.to_string())
    }
}

/// Result of this crate's operations.
pub type Result<T> = std::result::Result<T, MlError>;
