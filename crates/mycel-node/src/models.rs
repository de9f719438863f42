//! The models this node serves and the bounded queue they run behind.
//!
//! Models run one at a time on blocking threads (candle uses every core for one forward pass).
//! At most `max_queue` requests wait or run; past that a request is refused at once, so a
//! router can go elsewhere instead of queueing behind a busy node.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use mycel_core::statement::{ModelKind, ModelOffer};
use mycel_ml::{Embedder, Engine, GenerateParams, Generation, Generator, MlError};
use tokio::sync::{mpsc, Semaphore};

/// Requests waiting or running, at most, by default.
pub const DEFAULT_MAX_QUEUE: usize = 16;

/// How a served model runs.
#[derive(Debug, Clone)]
pub enum Runner {
    /// An embedding model.
    Embed(Arc<Embedder>),
    /// A generation model.
    Generate(Arc<Generator>),
}

/// A model this node serves.
#[derive(Debug, Clone)]
pub struct Served {
    /// What is announced about it.
    pub offer: ModelOffer,
    /// The loaded model.
    pub runner: Runner,
}

/// Why a request was not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The queue is full: try another node or later.
    #[error("this node's queue is full ({0} requests); try again later")]
    Busy(usize),
    /// The model refused the input or failed.
    #[error(transparent)]
    Model(#[from] MlError),
}

/// The node's models and their queue.
#[derive(Debug)]
pub struct ModelService {
    models: Vec<Served>,
    queue: Arc<Semaphore>,
    max_queue: usize,
    worker: Arc<Semaphore>,
}

/// Loads one model: a `.gguf` file is a generation model, a directory with config.json,
/// model.safetensors and tokenizer.json an embedding model.
pub fn load_model(path: &Path, engine: Engine) -> anyhow::Result<Served> {
    let what = || format!("cannot load the model at {}", path.display());
    if path.is_file() {
        let generator = Generator::load(path, engine).with_context(what)?;
        Ok(Served {
            offer: ModelOffer {
                id: generator.id(),
                name: generator.name().to_owned(),
                kind: ModelKind::Generation,
                engine: engine.name().to_owned(),
            },
            runner: Runner::Generate(Arc::new(generator)),
        })
    } else if path.is_dir() {
        let embedder = Embedder::load(path).with_context(what)?;
        Ok(Served {
            offer: ModelOffer {
                id: embedder.id(),
                name: embedder.name().to_owned(),
                kind: ModelKind::Embedding,
                engine: "candle-f32".to_owned(),
            },
            runner: Runner::Embed(Arc::new(embedder)),
        })
    } else {
        anyhow::bail!(
            "no model at {}: pass a .gguf file (generation) or a directory with config.json, \
             model.safetensors and tokenizer.json (embeddings); `bash scripts/fetch-models.sh` \
             fetches the reference models into .cache/models",
            path.display()
        )
    }
}

impl ModelService {
    /// Serves already loaded models.
    pub fn new(models: Vec<Served>, max_queue: usize) -> Self {
        Self {
            models,
            queue: Arc::new(Semaphore::new(max_queue)),
            max_queue,
            worker: Arc::new(Semaphore::new(1)),
        }
    }

    /// What to announce.
    pub fn offers(&self) -> Vec<ModelOffer> {
        self.models.iter().map(|m| m.offer.clone()).collect()
    }

    /// Every served model.
    pub fn models(&self) -> &[Served] {
        &self.models
    }

    /// The model called `name`, or whose content id is `name`.
    pub fn find(&self, name: &str) -> Option<&Served> {
        self.models
            .iter()
            .find(|m| m.offer.name == name || m.offer.id.to_string() == name)
    }

    /// Requests waiting or running.
    pub fn queue_depth(&self) -> usize {
        self.max_queue - self.queue.available_permits()
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, MlError> + Send + 'static,
    ) -> Result<T, RunError> {
        let _place = self
            .queue
            .clone()
            .try_acquire_owned()
            .map_err(|_| RunError::Busy(self.max_queue))?;
        let _turn = self
            .worker
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| RunError::Busy(self.max_queue))?;
        match tokio::task::spawn_blocking(work).await {
            Ok(result) => Ok(result?),
            Err(e) => Err(RunError::Model(MlError::Run(format!(
                "the model task failed: {e}"
            )))),
        }
    }

    /// Embeds `texts` with `model`.
    pub async fn embed(
        &self,
        model: Arc<Embedder>,
        texts: Vec<String>,
    ) -> Result<(Vec<Vec<f32>>, usize), RunError> {
        self.run(move || model.embed(&texts)).await
    }

    /// Generates with `model`; text goes to `stream` as it is made, when given (generation
    /// stops when its receiver is dropped).
    pub async fn generate(
        &self,
        model: Arc<Generator>,
        prompt: String,
        params: GenerateParams,
        stream: Option<mpsc::Sender<String>>,
    ) -> Result<Generation, RunError> {
        self.run(move || {
            model.generate(&prompt, &params, |text| match &stream {
                Some(tx) => tx.blocking_send(text.to_owned()).is_ok(),
                None => true,
            })
        })
        .await
    }
}
