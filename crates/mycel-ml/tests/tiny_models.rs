//! The model code on tiny random models written by `mycel_ml::fixtures`: embeddings and
//! generation behave (shapes, normalisation, batching, determinism, stop strings, limits)
//! and bad input is refused with a clear error.

use mycel_ml::fixtures::{write_tiny_bert, write_tiny_llama};
use mycel_ml::{
    BatchLimits, ChatMessage, Embedder, Engine, FinishReason, GenerateParams, Generator, MlError,
    Resume,
};

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()
}

#[test]
fn embeddings_are_unit_vectors_independent_of_batching() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path()).unwrap();
    let model = Embedder::load(dir.path()).unwrap();
    assert_eq!(model.dimension(), 16);

    let texts = [
        "the cat sat on the mat.",
        "the dog ran",
        "a big red dog ran on the mat",
    ];
    let (batch, tokens) = model.embed(&texts).unwrap();
    assert_eq!(batch.len(), 3);
    assert!(tokens > 3 * 2, "[CLS] and [SEP] at least");
    for (text, vector) in texts.iter().zip(&batch) {
        assert_eq!(vector.len(), 16);
        let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "unit length, got {norm}");
        // Padding to the batch's longest changes nothing.
        let (alone, _) = model.embed(&[*text]).unwrap();
        let diff = alone[0]
            .iter()
            .zip(vector)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "batched and alone differ by {diff}");
    }
    assert!(
        cosine(&batch[0], &batch[1]) < 0.9999,
        "different texts differ"
    );

    // The id covers the weights, not the files beside them.
    std::fs::write(dir.path().join("README.md"), "notes").unwrap();
    assert_eq!(Embedder::load(dir.path()).unwrap().id(), model.id());
}

#[test]
fn embedding_refuses_bad_input_and_bad_directories() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path()).unwrap();
    let model = Embedder::load(dir.path()).unwrap();
    let empty: [&str; 0] = [];
    assert!(matches!(model.embed(&empty), Err(MlError::Input(_))));
    let long = "the cat ".repeat(20);
    match model.embed(&["fine", long.as_str()]) {
        Err(MlError::Input(message)) => assert!(message.contains("input 1"), "{message}"),
        other => panic!("too long an input must be refused: {other:?}"),
    }

    let missing = tempfile::tempdir().unwrap();
    match Embedder::load(missing.path()) {
        Err(MlError::Model { reason, .. }) => assert!(reason.contains("config.json"), "{reason}"),
        other => panic!("{other:?}"),
    }
    std::fs::write(dir.path().join("model.safetensors"), b"not safetensors").unwrap();
    assert!(matches!(
        Embedder::load(dir.path()),
        Err(MlError::Model { .. })
    ));
}

/// Requests embedded in one run each get what they get alone (the same bits, their own
/// token counts), and one whose input is refused fails alone; callers at once share runs.
#[test]
fn requests_embedded_together_get_their_own_vectors_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path()).unwrap();
    let model = std::sync::Arc::new(Embedder::load(dir.path()).unwrap());
    let long = "the cat ".repeat(20);
    let requests: Vec<Vec<String>> = (0..12)
        .map(|i| match i {
            5 => vec!["fine".into(), long.clone()],
            _ => vec![format!("the dog {i}"), "a red cat ran ".repeat(1 + i % 3)],
        })
        .collect();
    type Embedded = mycel_ml::Result<(Vec<Vec<f32>>, usize)>;
    fn check(got: &Embedded, alone: &Embedded) {
        let bits = |v: &[Vec<f32>]| -> Vec<Vec<u32>> {
            v.iter()
                .map(|v| v.iter().map(|x| x.to_bits()).collect())
                .collect()
        };
        match (got, alone) {
            (Ok((v, n)), Ok((va, na))) => {
                assert_eq!(bits(v), bits(va));
                assert_eq!(n, na);
            }
            (Err(MlError::Input(m)), Err(MlError::Input(ma))) => {
                assert_eq!(m, ma);
                assert!(m.contains("input 1"), "{m}");
            }
            other => panic!("{other:?}"),
        }
    }
    let alone: Vec<Embedded> = requests.iter().map(|r| model.embed(r)).collect();
    let views: Vec<&[String]> = requests.iter().map(Vec::as_slice).collect();
    let many = model.embed_many(&views);
    assert_eq!(many.len(), 12);
    for (got, alone) in many.iter().zip(&alone) {
        check(got, alone);
    }
    // Without the refused one, one run serves them all.
    let fine: Vec<&[String]> = views
        .iter()
        .copied()
        .filter(|r| r.len() == 2 && r[1] != long)
        .collect();
    assert_eq!(fine.len(), 11);
    assert!(model.embed_many(&fine).iter().all(Result::is_ok));
    // Callers at once: while a first caller's run holds its turn, twelve requests queue, and
    // the next run takes all twelve; one whose caller stopped waiting is dropped unrun.
    use std::sync::atomic::AtomicBool;
    use std::sync::{mpsc, Arc};
    use std::time::{Duration, Instant};
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let gate = {
        let model = model.clone();
        std::thread::spawn(move || {
            let turn = || {
                let _ = entered_tx.send(());
                let _ = release_rx.recv_timeout(Duration::from_secs(60));
            };
            model
                .embed_together(vec!["the gate".into()], &Arc::default(), turn)
                .0
        })
    };
    entered_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let runs = model.runs();
    let (results_tx, results) = mpsc::channel();
    let count = requests.len();
    let stopped = Arc::new(AtomicBool::new(true));
    for (k, request) in requests.into_iter().enumerate() {
        let (model, results_tx) = (model.clone(), results_tx.clone());
        std::thread::spawn(move || {
            let (result, _) = model.embed_together(request, &Arc::default(), || ());
            let _ = results_tx.send((k, result));
        });
    }
    let quitter = {
        let (model, stopped) = (model.clone(), stopped.clone());
        std::thread::spawn(move || model.embed_together(vec!["gone".into()], &stopped, || ()).0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while model.waiting() < count + 1 {
        assert!(
            Instant::now() < deadline,
            "{} of {} queued",
            model.waiting(),
            count + 1
        );
        std::thread::yield_now();
    }
    release_tx.send(()).unwrap();
    assert!(gate.join().unwrap().is_ok());
    for _ in 0..count {
        let (k, result) = results.recv_timeout(Duration::from_secs(60)).unwrap();
        check(&result, &alone[k]);
    }
    assert!(matches!(quitter.join().unwrap(), Err(MlError::Stopped)));
    assert_eq!(
        model.runs(),
        runs + 2,
        "the gate's run, then one for all twelve"
    );
}

fn tiny_llama() -> (tempfile::TempDir, Generator) {
    tiny_llama_on(Engine::Exact)
}

fn tiny_llama_on(engine: Engine) -> (tempfile::TempDir, Generator) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path).unwrap();
    let model = Generator::load(&path, engine).unwrap();
    assert_eq!(model.engine(), engine);
    (dir, model)
}

#[test]
fn gguf_tokenizer_matches_control_tokens_and_round_trips_text() {
    let (_dir, model) = tiny_llama();
    let tokenizer = model.tokenizer();
    let text = "the cat, 2024 in Zürich\n\tnaïve 😀";
    let ids = tokenizer.encode(text).unwrap();
    assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    // Digits one by one (the smollm pre-tokenizer), merges applied.
    let ids = tokenizer.encode("2024").unwrap();
    assert_eq!(ids.len(), 4);
    assert!(tokenizer.encode(" the").unwrap().len() == 1, "Ġ t, Ġt he");
    // Control tokens are one id each, not spelled out byte by byte.
    let ids = tokenizer.encode("<|im_start|>user").unwrap();
    assert_eq!(
        tokenizer.token_text(ids[0]).as_deref(),
        Some("<|im_start|>")
    );
    assert_eq!(ids.len(), 1 + "user".len());

    // A model that starts prompts with BOS gets exactly one, also when its chat template
    // writes the BOS token itself.
    let mut with_bos = tokenizer.clone();
    with_bos.add_bos = true;
    let bos = with_bos.bos.unwrap();
    let bos_text = with_bos.token_text(bos).unwrap();
    let plain = with_bos.encode("the cat").unwrap();
    assert_eq!(plain[0], bos);
    assert_eq!(plain[1..], tokenizer.encode("the cat").unwrap()[..]);
    assert_eq!(
        with_bos.encode(&format!("{bos_text}the cat")).unwrap(),
        plain
    );
}

#[test]
fn chat_prompt_follows_the_template_in_the_file() {
    let (_dir, model) = tiny_llama();
    let prompt = model
        .chat_prompt(&[
            ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            },
        ])
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(matches!(model.chat_prompt(&[]), Err(MlError::Input(_))));
}

#[test]
fn greedy_and_seeded_generation_are_deterministic_and_stream_what_they_return() {
    // On candle's engine (one generation at a time) and on ours (the batch).
    for engine in [Engine::Exact, Engine::Q4] {
        let (_dir, model) = tiny_llama_on(engine);
        let greedy = GenerateParams {
            max_tokens: 12,
            ..Default::default()
        };
        let mut streamed = String::new();
        let first = model
            .generate("the cat", &greedy, |t| {
                streamed.push_str(t);
                true
            })
            .unwrap();
        let second = model.generate("the cat", &greedy, |_| true).unwrap();
        assert_eq!(first.tokens, second.tokens);
        assert_eq!(streamed, first.text);
        assert!(first.prompt_tokens >= 2);
        if first.finish_reason == FinishReason::Length {
            assert_eq!(first.tokens.len(), 12);
        }

        let sampled = |seed| GenerateParams {
            max_tokens: 24,
            temperature: Some(1.5),
            top_p: Some(0.95),
            seed,
            ..Default::default()
        };
        let a = model.generate("the cat", &sampled(7), |_| true).unwrap();
        let b = model.generate("the cat", &sampled(7), |_| true).unwrap();
        assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
        let others: Vec<Vec<u32>> = (8..12)
            .map(|seed| {
                model
                    .generate("the cat", &sampled(seed), |_| true)
                    .unwrap()
                    .tokens
            })
            .collect();
        assert!(
            others.iter().any(|t| *t != a.tokens),
            "other seeds give other tokens"
        );
    }
}

#[test]
fn a_resumed_generation_continues_exactly_where_the_first_left_off() {
    // On candle's engine (one generation at a time) and on ours (the batch).
    for engine in [Engine::Exact, Engine::Q4] {
        let (_dir, model) = tiny_llama_on(engine);
        for params in [
            GenerateParams {
                max_tokens: 30,
                ..Default::default()
            },
            GenerateParams {
                max_tokens: 30,
                temperature: Some(1.2),
                top_p: Some(0.9),
                seed: 11,
                ..Default::default()
            },
        ] {
            let whole = model.generate("the cat", &params, |_| true).unwrap();
            assert!(whole.tokens.len() > 12, "{:?}", whole.tokens);
            // The first worker delivered some text, then died after 9 tokens.
            let mut delivered = String::new();
            let mut seen = Vec::new();
            let _ = model.generate_from("the cat", &params, &Resume::default(), |text, tokens| {
                delivered.push_str(text);
                seen = tokens.to_vec();
                tokens.len() < 9
            });
            let resume = Resume {
                tokens: seen.clone(),
                text_bytes: delivered.len() as u64,
            };
            let mut rest = String::new();
            let resumed = model
                .generate_from("the cat", &params, &resume, |text, _| {
                    rest.push_str(text);
                    true
                })
                .unwrap();
            assert_eq!(resumed.tokens, whole.tokens, "{params:?}");
            assert_eq!(resumed.text, whole.text);
            assert_eq!(delivered + &rest, whole.text, "nothing lost or repeated");
        }
        // A resume point naming tokens the model lacks, or past the budget, is refused.
        let params = GenerateParams {
            max_tokens: 4,
            ..Default::default()
        };
        for tokens in [vec![u32::MAX], vec![1; 4]] {
            let resume = Resume {
                tokens,
                text_bytes: 3,
            };
            assert!(matches!(
                model.generate_from("the cat", &params, &resume, |_, _| true),
                Err(MlError::Input(_))
            ));
        }
        // A delivered count in the middle of a character, or past the text, is clamped.
        let resume = Resume {
            tokens: vec![200, 201],
            text_bytes: 1,
        };
        assert!(model
            .generate_from("the cat", &params, &resume, |_, _| true)
            .is_ok());
    }
}

#[test]
fn stop_strings_cut_the_text_and_limits_are_checked() {
    // On candle's engine (one generation at a time) and on ours (the batch).
    for engine in [Engine::Exact, Engine::Q4] {
        let (_dir, model) = tiny_llama_on(engine);
        let free = GenerateParams {
            max_tokens: 40,
            temperature: Some(1.0),
            seed: 3,
            ..Default::default()
        };
        let full = model.generate("the", &free, |_| true).unwrap();
        // Stop at a piece of what the model says anyway.
        let chars: Vec<char> = full.text.chars().collect();
        assert!(
            chars.len() >= 6,
            "the tiny model (fixed weights) says more: {full:?}"
        );
        {
            let stop: String = chars[3..5].iter().collect();
            let cut_at = full.text.find(&stop).unwrap();
            let params = GenerateParams {
                stop: vec![stop.clone()],
                ..free.clone()
            };
            let mut streamed = String::new();
            let stopped = model
                .generate("the", &params, |t| {
                    streamed.push_str(t);
                    true
                })
                .unwrap();
            assert_eq!(stopped.text, full.text[..cut_at]);
            assert_eq!(streamed, stopped.text);
            assert_eq!(stopped.finish_reason, FinishReason::Stop);
        }

        for bad in [
            GenerateParams {
                max_tokens: 0,
                ..Default::default()
            },
            GenerateParams {
                max_tokens: 10_000,
                ..Default::default()
            },
            GenerateParams {
                temperature: Some(-1.0),
                ..Default::default()
            },
            GenerateParams {
                stop: vec![String::new()],
                ..Default::default()
            },
        ] {
            assert!(
                matches!(
                    model.generate("the", &bad, |_| true),
                    Err(MlError::Input(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            model.generate("", &GenerateParams::default(), |_| true),
            Err(MlError::Input(_))
        ));
    }
}

#[test]
fn a_file_that_is_not_gguf_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF but not really").unwrap();
    match Generator::load(&path, Engine::Exact) {
        Err(MlError::Model { path: p, reason }) => {
            assert!(
                p.ends_with("broken.gguf") && reason.contains("GGUF"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_quantized_engine_loads_and_decodes_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path).unwrap();
    let model = Generator::load(&path, Engine::Quantized).unwrap();
    assert_eq!(model.engine(), Engine::Quantized);
    let params = GenerateParams {
        max_tokens: 8,
        ..Default::default()
    };
    let a = model.generate("the cat", &params, |_| true).unwrap();
    let b = model.generate("the cat", &params, |_| true).unwrap();
    assert!(!a.tokens.is_empty());
    assert_eq!(a.tokens, b.tokens);
    // Same file, same id, whichever engine runs it.
    assert_eq!(
        model.id(),
        Generator::load(&path, Engine::Exact).unwrap().id()
    );
}

#[test]
fn the_q4_engine_agrees_with_the_exact_engine_and_falls_back_for_other_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path).unwrap();
    let q4 = Generator::load(&path, Engine::Q4).unwrap();
    assert_eq!(q4.engine(), Engine::Q4);
    assert_eq!(q4.engine().name(), "mycel-q4");
    let exact = Generator::load(&path, Engine::Exact).unwrap();
    let greedy = GenerateParams {
        max_tokens: 24,
        ..Default::default()
    };
    let prompt = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n";
    let ours = q4.generate(prompt, &greedy, |_| true).unwrap();
    assert!(ours.tokens.len() > 4, "{:?}", ours.tokens);
    assert_eq!(
        ours.tokens,
        exact.generate(prompt, &greedy, |_| true).unwrap().tokens,
        "the same weights, the same greedy tokens"
    );
    assert_eq!(
        ours.tokens,
        q4.generate(prompt, &greedy, |_| true).unwrap().tokens
    );

    // A file whose matrices are f32 has no q4 kernel: it runs on the exact engine.
    let f32_path = dir.path().join("tiny-f32.gguf");
    mycel_ml::fixtures::write_f32_copy(&path, &f32_path).unwrap();
    let fallback = Generator::load(&f32_path, Engine::Q4).unwrap();
    assert_eq!(fallback.engine(), Engine::Exact);
}

/// A copy of the tiny llama at `from`, with `changes` made to its metadata, at `to`.
fn with_metadata(
    from: &std::path::Path,
    to: &std::path::Path,
    changes: &[(&str, candle_core::quantized::gguf_file::Value)],
) {
    use candle_core::quantized::gguf_file;
    let mut file = std::fs::File::open(from).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| {
            let tensor = content
                .tensor(&mut file, name, &candle_core::Device::Cpu)
                .unwrap();
            (name.clone(), tensor)
        })
        .collect();
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| changes.iter().all(|(c, _)| c != k) && k.as_str() != "general.alignment")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.extend(changes.iter().map(|(k, v)| (*k, v)));
    let tensors: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(to).unwrap();
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
}

/// A model file is untrusted input (a peer can send any bytes as a model): a header that
/// claims more than the file holds, or hyper-parameters no model has, is refused with an error
/// that names what is wrong, on every engine, before anything is allocated from it (a header
/// claiming 4,294,967,295 layers made the loader abort the process).
#[test]
fn a_model_file_claiming_absurd_sizes_is_refused_on_every_engine_without_allocating() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("tiny.gguf");
    write_tiny_llama(&good).unwrap();
    let bad = dir.path().join("bad.gguf");
    let cases: Vec<(&str, Value)> = vec![
        ("llama.block_count", Value::U32(u32::MAX)),
        ("llama.block_count", Value::U32(200)),
        ("llama.embedding_length", Value::U32(u32::MAX)),
        ("llama.attention.head_count", Value::U32(0)),
        ("llama.attention.head_count_kv", Value::U32(1 << 20)),
        ("llama.rope.dimension_count", Value::U32(u32::MAX)),
        ("llama.feed_forward_length", Value::U64(u64::MAX)),
        ("llama.expert_count", Value::U32(u32::MAX)),
        ("llama.block_count", Value::String("many".into())),
    ];
    for (key, value) in cases {
        let shown = format!("{key} = {value:?}");
        with_metadata(&good, &bad, &[(key, value)]);
        for engine in [Engine::Q4, Engine::Quantized, Engine::Exact] {
            match Generator::load(&bad, engine) {
                Err(MlError::Model { reason, .. }) => {
                    assert!(reason.contains(key), "{shown} on {engine:?}: {reason}")
                }
                other => panic!("{shown} on {engine:?} must be refused: {other:?}"),
            }
        }
    }

    // A tensor whose shape claims more elements than the file could hold (the dimension of
    // output_norm.weight rewritten in place to 2^62).
    let mut bytes = std::fs::read(&good).unwrap();
    let name = b"output_norm.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("the tensor's name in the header")
        + name.len();
    assert_eq!(&bytes[at..at + 4], &1u32.to_le_bytes(), "one dimension");
    bytes[at + 4..at + 12].copy_from_slice(&(1u64 << 62).to_le_bytes());
    std::fs::write(&bad, &bytes).unwrap();
    for engine in [Engine::Q4, Engine::Quantized, Engine::Exact] {
        match Generator::load(&bad, engine) {
            Err(MlError::Model { reason, .. }) => {
                assert!(reason.contains("output_norm.weight"), "{reason}")
            }
            other => panic!("a tensor of 2^62 elements on {engine:?}: {other:?}"),
        }
    }
    // Tensors that together claim more bytes than the file (as tensors aliasing the same
    // bytes would): output_norm.weight (f32) rewritten to half as many elements as the file
    // has bytes, so twice the file's size on its own.
    let mut bytes = std::fs::read(&good).unwrap();
    let half = bytes.len() as u64 / 2;
    bytes[at + 4..at + 12].copy_from_slice(&half.to_le_bytes());
    std::fs::write(&bad, &bytes).unwrap();
    match Generator::load(&bad, Engine::Q4) {
        Err(MlError::Model { reason, .. }) => {
            assert!(reason.contains("more than the file"), "{reason}")
        }
        other => panic!("tensors larger together than the file: {other:?}"),
    }
    // The untouched file still loads.
    Generator::load(&good, Engine::Q4).unwrap();
}

/// A chat template that would run for hours (it comes with the file, from whoever made it)
/// fails the request within a bounded time instead of holding the node.
#[test]
fn a_chat_template_that_loops_fails_the_request_quickly() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("tiny.gguf");
    write_tiny_llama(&good).unwrap();
    let looping = dir.path().join("looping.gguf");
    let template =
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}";
    with_metadata(
        &good,
        &looping,
        &[("tokenizer.chat_template", Value::String(template.into()))],
    );
    let model = Generator::load(&looping, Engine::Q4).unwrap();
    let messages = [ChatMessage {
        role: "user".into(),
        content: "hello".into(),
    }];
    let started = std::time::Instant::now();
    let result = model.chat_prompt(&messages);
    let took = started.elapsed();
    assert!(result.is_err(), "a template of 10^10 steps finished");
    assert!(took < std::time::Duration::from_secs(10), "it ran {took:?}");
    // An honest template on the same machinery is untouched by the bound.
    let model = Generator::load(&good, Engine::Q4).unwrap();
    assert!(model.chat_prompt(&messages).unwrap().contains("hello"));
}

fn tiny_q4(limits: BatchLimits) -> (tempfile::TempDir, std::sync::Arc<Generator>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path).unwrap();
    let model = Generator::load_with(&path, Engine::Q4, limits).unwrap();
    assert_eq!(model.batch_limits(), Some(limits));
    (dir, std::sync::Arc::new(model))
}

const CHAT: &str = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n";

/// Requests running at once on the q4 engine share its passes (requests that start while
/// another is decoding join its passes), and each gets the tokens it gets alone, greedy or
/// seeded, with its prompt read whole or in chunks.
#[test]
fn concurrent_requests_decode_together_and_each_gets_its_own_tokens() {
    let limits = BatchLimits {
        slots: 4,
        kv_bytes: 64 << 20,
        prefill_chunk: 3,
        ..Default::default()
    };
    let (_dir, model) = tiny_q4(limits);
    let (_dir2, whole) = tiny_q4(BatchLimits {
        prefill_chunk: 4096,
        ..limits
    });
    let params = |seed: Option<u64>, max_tokens| GenerateParams {
        max_tokens,
        temperature: seed.map(|_| 1.3),
        seed: seed.unwrap_or(0),
        ..Default::default()
    };
    let prompts = [
        (CHAT.to_owned(), params(None, 1000)),
        (format!("{CHAT}the dog and the cat"), params(Some(5), 40)),
        ("the".to_owned(), params(Some(9), 40)),
    ];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|(p, params)| whole.generate(p, params, |_| true).unwrap().tokens)
        .collect();
    assert!(alone.iter().all(|t| t.len() > 4), "{alone:?}");
    assert!(
        alone[0].len() > 500,
        "the first runs long: {}",
        alone[0].len()
    );
    assert_eq!(whole.batch_stats().unwrap().widest, 1, "one at a time");

    let (first_tx, first_rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let waiter = {
        let (model, (prompt, params)) = (model.clone(), prompts[0].clone());
        std::thread::spawn(move || {
            let mut waited = false;
            model
                .generate(&prompt, &params, |_| {
                    if !waited {
                        // Running: the others start now, and this caller waits for one of
                        // them to make a token (the batch goes on meanwhile).
                        waited = true;
                        started_tx.send(()).unwrap();
                        first_rx
                            .recv_timeout(std::time::Duration::from_secs(20))
                            .expect("another request made progress while this one waited");
                    }
                    true
                })
                .unwrap()
                .tokens
        })
    };
    started_rx.recv().unwrap();
    let others: Vec<_> = prompts[1..]
        .iter()
        .cloned()
        .map(|(prompt, params)| {
            let (model, first_tx) = (model.clone(), first_tx.clone());
            std::thread::spawn(move || {
                model
                    .generate(&prompt, &params, |_| {
                        let _ = first_tx.send(());
                        true
                    })
                    .unwrap()
                    .tokens
            })
        })
        .collect();
    let mut together = vec![waiter.join().unwrap()];
    together.extend(others.into_iter().map(|t| t.join().unwrap()));
    assert_eq!(together, alone);
    let stats = model.batch_stats().unwrap();
    assert!(stats.widest >= 2, "requests shared passes: {stats:?}");
    assert!(stats.steps > stats.passes, "{stats:?}");
}

/// A request whose tokens start like ones read before (a shared system prompt, the earlier
/// turns of a conversation) starts from their cached keys and values and reads only what
/// follows, and its answer is the tokens it gets without the cache.
#[test]
fn requests_that_start_alike_read_only_what_follows_and_answer_the_same() {
    let limits = BatchLimits {
        slots: 2,
        kv_bytes: 64 << 20,
        prefill_chunk: 4,
        ..Default::default()
    };
    let (_dir, cached) = tiny_q4(limits);
    let (_dir2, plain) = tiny_q4(BatchLimits {
        prefix_bytes: 0,
        ..limits
    });
    let system = "<|im_start|>system\nthe cat and the dog and the cat and the dog<|im_end|>\n";
    let ask = |q: &str| format!("{system}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
    let params = GenerateParams {
        max_tokens: 20,
        ..Default::default()
    };
    // Runs `prompt` on both models: the cached one's answer, its passes and the positions it
    // did not read again.
    let both = |prompt: &str| {
        let before = cached.batch_stats().unwrap();
        let answer = cached.generate(prompt, &params, |_| true).unwrap();
        let after = cached.batch_stats().unwrap();
        let plain_before = plain.batch_stats().unwrap().passes;
        let reference = plain.generate(prompt, &params, |_| true).unwrap();
        let plain_passes = plain.batch_stats().unwrap().passes - plain_before;
        assert_eq!(answer.tokens, reference.tokens, "{prompt:?}");
        let reused = after.prefix_tokens - before.prefix_tokens;
        let passes = after.passes - before.passes;
        // Four prompt tokens a pass: the reused ones save their passes.
        assert!(
            passes + reused.div_ceil(4) <= plain_passes + 1,
            "{passes} passes reusing {reused} positions, {plain_passes} without"
        );
        (answer, reused)
    };
    let (first, reused) = both(&ask("the cat"));
    assert_eq!(reused, 0, "nothing read before");
    let (second, reused) = both(&ask("the dog"));
    assert!(
        reused as usize >= second.prompt_tokens / 2 && (reused as usize) < second.prompt_tokens,
        "the system prompt, not the question: {reused} of {}",
        second.prompt_tokens
    );
    // The next turn of the first conversation: its prompt and its answer were kept.
    let turn = format!(
        "{}{}<|im_end|>\n<|im_start|>user\nand the dog?<|im_end|>\n<|im_start|>assistant\n",
        ask("the cat"),
        first.text
    );
    let (_, reused) = both(&turn);
    assert!(
        reused as usize > first.prompt_tokens,
        "the earlier answer too: {reused} positions, the first prompt had {}",
        first.prompt_tokens
    );
    assert_eq!(plain.batch_stats().unwrap().prefix_hits, 0);
    assert_eq!(cached.batch_stats().unwrap().prefix_hits, 2);

    // Another requester's requests share nothing with these: the same prompt is read whole.
    let stop = std::sync::Arc::default();
    let hits = || cached.batch_stats().unwrap().prefix_hits;
    let other = |scope| {
        cached
            .generate_scoped(
                scope,
                &ask("the dog"),
                &params,
                &Default::default(),
                &stop,
                |_, _, _| true,
            )
            .unwrap()
    };
    let answer = other(7);
    assert_eq!(answer.tokens, second.tokens);
    assert_eq!(hits(), 2, "nothing of scope 0 for scope 7");
    // The whole prompt held: only its last token is read.
    assert_eq!(other(7).tokens, second.tokens);
    assert_eq!(hits(), 3, "scope 7's own prompt, read before");
}

/// A request that could never fit the KV budget is refused before it starts, with the
/// limits; requests that do not fit beside each other take turns; a caller that stops frees
/// its slot at once, and one that stops while waiting for a slot never takes one.
#[test]
fn the_kv_budget_refuses_what_cannot_fit_and_callers_that_leave_free_their_room() {
    let (_dir, model) = tiny_q4(BatchLimits {
        slots: 2,
        // 200 positions: 2 blocks × keys and values × 2 heads of 16 × 4 bytes each.
        kv_bytes: 200 * 2 * 2 * 32 * 4,
        prefill_chunk: 64,
        ..Default::default()
    });
    let with_max = |max_tokens| GenerateParams {
        max_tokens,
        ..Default::default()
    };
    match model.generate(CHAT, &with_max(400), |_| true) {
        Err(MlError::Input(why)) => {
            assert!(
                why.contains("KV cache") && why.contains("200 positions"),
                "{why}"
            )
        }
        other => panic!("must be refused: {other:?}"),
    }
    // Told to fit, it fits the budget instead.
    let fitted = GenerateParams {
        fit_context: true,
        ..with_max(400)
    };
    let fit = model.generate(CHAT, &fitted, |_| true).unwrap();
    assert!(fit.prompt_tokens + fit.tokens.len() <= 200);

    // Two that need 170 positions each take turns, however they arrive.
    let before = model.batch_stats().unwrap();
    let both: Vec<_> = (0..2)
        .map(|_| {
            let model = model.clone();
            std::thread::spawn(move || model.generate(CHAT, &with_max(150), |_| true).unwrap())
        })
        .collect();
    let both: Vec<_> = both.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(both[0].tokens, both[1].tokens);
    assert!(both[0].tokens.len() > 100, "{}", both[0].tokens.len());
    let after = model.batch_stats().unwrap();
    assert_eq!(after.widest, 1, "they never shared a pass: {after:?}");
    let alone_passes = (after.passes - before.passes) / 2;

    // A caller that stops after two pieces: its request leaves the batch within a pass or
    // two of the stop, not at its 150th token. The batch does not wait for its callers, so
    // on a busy machine it may have run ahead of this one before the stop: the passes are
    // counted from the moment the caller stops.
    let mut seen = 0;
    let mut at_stop = 0;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cut = model
        .generate_watching(CHAT, &with_max(150), &Default::default(), &stop, |_, _| {
            seen += 1;
            if seen < 2 {
                return true;
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            at_stop = model.batch_stats().unwrap().passes;
            false
        })
        .unwrap();
    assert!(cut.tokens.len() < 10, "{}", cut.tokens.len());
    let after_cut = model.batch_stats().unwrap().passes;
    assert!(
        after_cut <= at_stop + 2,
        "the cut request ran {} passes after its caller stopped",
        after_cut - at_stop
    );
    let full = model.generate(CHAT, &with_max(150), |_| true).unwrap();
    assert_eq!(full.tokens[..cut.tokens.len()], cut.tokens[..]);
    let full_passes = model.batch_stats().unwrap().passes - after_cut;
    assert!(
        full_passes >= alone_passes.saturating_sub(1),
        "an uncut request runs its whole length: {full_passes} against {alone_passes}"
    );

    // One whose caller has stopped before it got a slot never runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let before = model.batch_stats().unwrap();
    let stopped =
        model.generate_watching(CHAT, &with_max(150), &Default::default(), &stop, |_, _| {
            true
        });
    assert!(matches!(stopped, Err(MlError::Stopped)), "{stopped:?}");
    assert_eq!(model.batch_stats().unwrap().passes, before.passes);
}

/// ln softmax of `logits` by the textbook formula, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .map(|l| f64::from(*l))
        .fold(f64::MIN, f64::max);
    let norm = max
        + logits
            .iter()
            .map(|l| (f64::from(*l) - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|l| f64::from(*l) - norm).collect()
}

#[test]
fn log_probabilities_are_the_models_softmax_at_each_generated_token() {
    use candle_core::quantized::gguf_file;
    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_llama::ModelWeights;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path).unwrap();
    let prompt = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n";
    // The references: candle's model reading each whole context afresh, on the file's
    // quantised weights (what the candle-q engine runs) or on them dequantised to f32 (what
    // the exact engine runs, and what ours approximates).
    let f32_path = dir.path().join("tiny-f32.gguf");
    mycel_ml::fixtures::write_f32_copy(&path, &f32_path).unwrap();
    let reference = |path: &std::path::Path| {
        let mut file = std::fs::File::open(path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
        move |context: &[u32]| -> Vec<f64> {
            model.clear_kv_cache();
            let input = Tensor::new(context, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.forward(&input, 0).unwrap().squeeze(0).unwrap();
            log_softmax(&logits.to_vec1::<f32>().unwrap())
        }
    };
    for (engine, reference_path, tolerance) in [
        (Engine::Exact, &f32_path, 1e-4),
        (Engine::Quantized, &path, 1e-4),
        // Ours rounds activations to 16 bits per block of 32: logits a few thousandths off.
        (Engine::Q4, &f32_path, 1e-2),
    ] {
        let mut logprobs_after = reference(reference_path);
        let model = Generator::load(&path, engine).unwrap();
        let tokenizer = model.tokenizer();
        let asked = GenerateParams {
            max_tokens: 12,
            logprobs: Some(3),
            ..Default::default()
        };
        let scored = model.generate(prompt, &asked, |_| true).unwrap();
        let plain = model
            .generate(
                prompt,
                &GenerateParams {
                    logprobs: None,
                    ..asked.clone()
                },
                |_| true,
            )
            .unwrap();
        assert_eq!(
            plain.tokens, scored.tokens,
            "{engine:?}: asking changes no token"
        );
        assert!(plain.logprobs.is_empty());
        assert!(scored.tokens.len() > 4, "{:?}", scored.tokens);
        assert_eq!(scored.logprobs.len(), scored.tokens.len());
        let mut context = tokenizer.encode(prompt).unwrap();
        let mut spelled = Vec::new();
        for (token, l) in scored.tokens.iter().zip(&scored.logprobs) {
            let expected = logprobs_after(&context);
            assert_eq!(l.chosen.token, *token);
            assert_eq!(l.chosen.bytes, tokenizer.token_bytes(*token));
            let off = (f64::from(l.chosen.logprob) - expected[*token as usize]).abs();
            assert!(
                off < tolerance,
                "{engine:?}: {} against {} at {}; top {:?}; expected {:?}",
                l.chosen.logprob,
                expected[*token as usize],
                context.len(),
                l.top,
                l.top
                    .iter()
                    .map(|t| expected[t.token as usize])
                    .collect::<Vec<_>>()
            );
            // Greedy: the chosen token is the most likely one.
            assert_eq!(l.top.len(), 3);
            assert_eq!(
                (l.top[0].token, l.top[0].logprob),
                (*token, l.chosen.logprob)
            );
            for alternative in &l.top {
                let off =
                    (f64::from(alternative.logprob) - expected[alternative.token as usize]).abs();
                assert!(off < tolerance, "{engine:?}: alternative {alternative:?}");
            }
            if engine != Engine::Q4 {
                let mut ranked: Vec<u32> = (0..expected.len() as u32).collect();
                ranked.sort_by(|a, b| expected[*b as usize].total_cmp(&expected[*a as usize]));
                let top: Vec<u32> = l.top.iter().map(|t| t.token).collect();
                assert_eq!(top, ranked[..3], "the three most likely, in order");
            }
            if !tokenizer.token_text(*token).unwrap().starts_with("<|") {
                spelled.extend_from_slice(&l.chosen.bytes);
            }
            context.push(*token);
        }
        assert_eq!(
            String::from_utf8_lossy(&spelled),
            scored.text,
            "the bytes spell the text"
        );

        // Resumed after five tokens: the rest of the run's log-probabilities.
        let resume = Resume {
            tokens: scored.tokens[..5].to_vec(),
            text_bytes: 0,
        };
        let resumed = model
            .generate_from(prompt, &asked, &resume, |_, _| true)
            .unwrap();
        assert_eq!(resumed.tokens, scored.tokens);
        // Ours and candle's quantised kernels compute a row the same whether it is read with
        // others or alone; candle's f32 products (the exact engine) round by batch shape.
        if engine == Engine::Exact {
            for (a, b) in resumed.logprobs.iter().zip(&scored.logprobs[5..]) {
                assert!((a.chosen.logprob - b.chosen.logprob).abs() < 1e-4);
            }
        } else {
            assert_eq!(resumed.logprobs, scored.logprobs[5..], "{engine:?}");
        }

        // Sampled: the same seed gives the same bits; each is the drawn token's.
        let sampled = GenerateParams {
            temperature: Some(1.5),
            seed: 11,
            ..asked.clone()
        };
        let a = model.generate(prompt, &sampled, |_| true).unwrap();
        let b = model.generate(prompt, &sampled, |_| true).unwrap();
        assert_eq!(a.logprobs, b.logprobs);
        assert_ne!(
            a.tokens, scored.tokens,
            "{engine:?}: sampling drew other tokens"
        );
        for (token, l) in a.tokens.iter().zip(&a.logprobs) {
            assert_eq!(l.chosen.token, *token);
            assert!(l.chosen.logprob <= l.top[0].logprob);
        }
    }
}

#[test]
fn a_format_holds_every_engines_answer_to_its_shape() {
    use mycel_core::grammar::{Grammar, Shape};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path).unwrap();
    let prompt = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n";
    let shape = Shape::Object(vec![
        ("ok".into(), Shape::Boolean),
        ("n".into(), Shape::Integer),
        (
            "mood".into(),
            Shape::OneOf(vec!["\"calm\"".into(), "\"cross\"".into()]),
        ),
        ("none".into(), Shape::Null),
    ]);
    // Every part is bounded (no string or array, which a random model need never close), so
    // the answer ends well within its budget.
    let grammar = Grammar::new(&shape).unwrap();
    for engine in [Engine::Q4, Engine::Exact, Engine::Quantized] {
        let model = Generator::load(&path, engine).unwrap();
        let free = GenerateParams {
            max_tokens: 300,
            ..Default::default()
        };
        let unformatted = model.generate(prompt, &free, |_| true).unwrap();
        assert!(
            !grammar.begins(unformatted.text.as_bytes()),
            "{engine:?}: the random model writes no JSON of itself"
        );
        let held = GenerateParams {
            format: Some(shape.clone()),
            ..free.clone()
        };
        for (temperature, seed) in [(None, 0), (Some(1.5), 1), (Some(1.5), 2)] {
            let params = GenerateParams {
                temperature,
                seed,
                ..held.clone()
            };
            let answer = model.generate(prompt, &params, |_| true).unwrap();
            assert_eq!(
                answer.finish_reason,
                FinishReason::Stop,
                "{engine:?}: {answer:?}"
            );
            assert!(
                grammar.matches(answer.text.as_bytes()),
                "{engine:?}: {}",
                answer.text
            );
            let value: serde_json::Value = serde_json::from_str(&answer.text).unwrap();
            assert!(value["ok"].is_boolean() && value["n"].is_i64() && value["none"].is_null());
            assert!(["calm", "cross"].contains(&value["mood"].as_str().unwrap()));
        }
        // A resumed answer goes on in the format, as the whole one did.
        let whole = model.generate(prompt, &held, |_| true).unwrap();
        let resume = Resume {
            tokens: whole.tokens[..6].to_vec(),
            text_bytes: 0,
        };
        let resumed = model
            .generate_from(prompt, &held, &resume, |_, _| true)
            .unwrap();
        assert_eq!(resumed.tokens, whole.tokens, "{engine:?}");
        // A resume point outside the format is refused.
        let off = Resume {
            tokens: unformatted.tokens[..3].to_vec(),
            text_bytes: 0,
        };
        assert!(matches!(
            model.generate_from(prompt, &held, &off, |_, _| true),
            Err(MlError::Run(_))
        ));
        // Any object, cut short: a beginning of one.
        let object = GenerateParams {
            max_tokens: 40,
            format: Some(Shape::AnyObject),
            ..Default::default()
        };
        let answer = model.generate(prompt, &object, |_| true).unwrap();
        let any = Grammar::new(&Shape::AnyObject).unwrap();
        assert!(any.begins(answer.text.as_bytes()), "{}", answer.text);
        if answer.finish_reason == FinishReason::Stop {
            assert!(serde_json::from_str::<serde_json::Value>(&answer.text)
                .unwrap()
                .is_object());
        }
    }
}

#[test]
fn text_decoded_token_by_token_is_the_whole_decode_at_every_token() {
    use mycel_ml::gguf_tokenizer::TextDecoder;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path).unwrap();
    let model = Generator::load(&path, Engine::Q4).unwrap();
    let tokenizer = model.tokenizer();
    let vocab = tokenizer.vocab_size() as u64;
    // Random tokens: split characters, bytes that are no UTF-8, control tokens among them.
    let mut state = 7u64;
    for _ in 0..50 {
        let mut decoder = TextDecoder::default();
        let mut tokens = Vec::new();
        for _ in 0..40 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let token = ((state >> 33) % vocab) as u32;
            tokens.push(token);
            decoder.push(tokenizer, token);
            assert_eq!(
                decoder.text(),
                tokenizer.decode(&tokens).unwrap(),
                "{tokens:?}"
            );
        }
    }
    // A character split over tokens shows as U+FFFD until it ends.
    let e_acute = [tokenizer.encode("é").unwrap()].concat();
    let mut decoder = TextDecoder::default();
    for (i, token) in e_acute.iter().enumerate() {
        decoder.push(tokenizer, *token);
        let whole = i + 1 == e_acute.len();
        assert_eq!(decoder.text() == "é", whole, "{e_acute:?}");
    }
}
