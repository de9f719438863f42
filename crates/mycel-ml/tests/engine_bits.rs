//! The f32 engine's bits do not depend on how many threads run it: gemm splits rows and
//! columns among threads, never a sum, so the engine name (`embed::f32_engine`) holds only
//! the kernel and the block of the summed dimension.
//!
//! Runs on all-MiniLM-L6-v2 (`bash scripts/fetch-models.sh`): its 1,536-wide products are
//! long enough to be blocked. Where it is absent the test says so and passes;
//! `MYCEL_REQUIRE_MODELS=1` (set by CI) makes its absence a failure.

use std::path::PathBuf;

use mycel_ml::Embedder;

/// all-MiniLM-L6-v2's directory, or `None` (having said so) where it is absent.
fn minilm(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("MYCEL_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models"))
        .join("all-minilm-l6-v2");
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    mycel_ml::fixtures::skip_unless_required(
        test,
        "MYCEL_REQUIRE_MODELS",
        &format!(
            "{} is absent (run `bash scripts/fetch-models.sh`)",
            dir.display()
        ),
    );
    None
}

#[test]
fn embeddings_are_the_same_bits_on_any_number_of_threads() {
    let Some(dir) = minilm("the thread-count bit test") else {
        return;
    };
    let engine = mycel_ml::embed::f32_engine();
    assert!(
        engine.starts_with("candle-f32-") && engine.contains("-kc"),
        "{engine}"
    );
    eprintln!("engine {engine}");
    let model = Embedder::load(&dir).unwrap();
    let words = ["river", "kernel", "quorum", "lantern", "harvest"];
    let sentences: Vec<String> = (0..48)
        .map(|i| format!("sentence {i} is about the {} ", words[i % 5]).repeat(1 + i % 4))
        .collect();
    let mut first: Option<Vec<Vec<u32>>> = None;
    for threads in [1, 2, 3, 8, 1] {
        // The encoder asks gemm for as many threads as the pool it runs on has.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (vectors, _) = pool.install(|| model.embed(&sentences)).unwrap();
        let bits: Vec<Vec<u32>> = vectors
            .iter()
            .map(|v| v.iter().map(|x| x.to_bits()).collect())
            .collect();
        match &first {
            None => first = Some(bits),
            Some(first) => {
                let differing = first.iter().zip(&bits).filter(|(a, b)| a != b).count();
                assert_eq!(differing, 0, "{threads} threads: {differing} of 48 differ");
            }
        }
    }
}

/// A sentence's embedding does not depend on what it was embedded with: alone, in a batch,
/// or among another request's sentences (`Embedder::embed_together`), the same bits, so
/// replicas that batch their requests differently still agree.
#[test]
fn an_embedding_is_the_same_bits_alone_and_among_others() {
    let Some(dir) = minilm("the batch-composition bit test") else {
        return;
    };
    let model = Embedder::load(&dir).unwrap();
    let words = ["river", "kernel", "quorum", "lantern", "harvest"];
    let sentences: Vec<String> = (0..40)
        .map(|i| format!("sentence {i} is about the {} ", words[i % 5]).repeat(1 + i % 4))
        .collect();
    let bits = |vectors: &[Vec<f32>]| -> Vec<Vec<u32>> {
        vectors
            .iter()
            .map(|v| v.iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    let together = bits(&model.embed(&sentences).unwrap().0);
    let alone: Vec<Vec<u32>> = sentences
        .iter()
        .flat_map(|s| bits(&model.embed(std::slice::from_ref(s)).unwrap().0))
        .collect();
    assert_eq!(together, alone);
    // Requests at once, combined into shared batches: each gets its own sentences' bits.
    let model = std::sync::Arc::new(model);
    let threads: Vec<_> = sentences
        .chunks(3)
        .map(|chunk| {
            let (model, chunk) = (model.clone(), chunk.to_vec());
            std::thread::spawn(move || {
                let stop = std::sync::Arc::default();
                model.embed_together(chunk, &stop, || ()).0.unwrap()
            })
        })
        .collect();
    let combined: Vec<Vec<u32>> = threads
        .into_iter()
        .flat_map(|t| bits(&t.join().unwrap().0))
        .collect();
    assert_eq!(combined, alone);
}
