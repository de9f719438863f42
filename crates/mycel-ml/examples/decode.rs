//! Decoding speed of one generation model, alone (for profiling the engines):
//! `cargo run --release -p mycel-ml --example decode -- MODEL.gguf [q4|exact|quantized] [TOKENS]
//! [PASSES] [json]` (`json`: held to any JSON object, as `response_format: json_object` does).

use mycel_ml::{ChatMessage, Engine, GenerateParams, Generator};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: decode MODEL.gguf [engine] [tokens] [passes]")?;
    let engine = match args.next().as_deref() {
        None | Some("q4") => Engine::Q4,
        Some("exact") => Engine::Exact,
        Some("quantized") => Engine::Quantized,
        Some(other) => return Err(format!("unknown engine {other}").into()),
    };
    let tokens: usize = args.next().map_or(Ok(64), |t| t.parse())?;
    let passes: usize = args.next().map_or(Ok(5), |t| t.parse())?;
    let format = match args.next().as_deref() {
        None => None,
        Some("json") => Some(mycel_core::grammar::Shape::AnyObject),
        Some(other) => return Err(format!("unknown format {other} (json is known)").into()),
    };
    let model = Generator::load(path.as_ref(), engine)?;
    let prompt = model.chat_prompt(&[ChatMessage {
        role: "user".into(),
        content: match format {
            None => "Explain in detail how a peer-to-peer network finds other nodes.".into(),
            Some(_) => "Describe three cats as JSON: for each its name, age, colour and a long \
                        description of its habits."
                .into(),
        },
    }])?;
    let params = GenerateParams {
        max_tokens: tokens,
        format,
        ..Default::default()
    };
    let mut rates = Vec::new();
    for pass in 0..=passes {
        let g = model.generate(&prompt, &params, |_| true)?;
        let rate = (g.tokens.len() - 1) as f64 / (g.decode_ms / 1e3);
        let prefill = g.prompt_tokens as f64 / (g.prompt_ms / 1e3);
        println!("pass {pass}: decode {rate:.1} tok/s, prefill {prefill:.1} tok/s");
        if pass == 0 && params.format.is_some() {
            println!("{}", g.text);
        }
        if pass > 0 {
            rates.push(rate);
        }
    }
    rates.sort_by(f64::total_cmp);
    println!("median decode {:.1} tok/s", rates[rates.len() / 2]);
    Ok(())
}
