#!/usr/bin/env python3
"""Records reference outputs of the reference models from independent implementations, once.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install sentence-transformers transformers gguf accelerate
    bash scripts/fetch-models.sh
    /tmp/ref/bin/python scripts/reference_values.py

Writes crates/mycel-ml/tests/data/reference.json:
  - all-MiniLM-L6-v2 embeddings by sentence-transformers (PyTorch), normalised;
  - SmolLM2-135M-Instruct: token ids by the Hugging Face tokenizer that transformers builds
    from the GGUF, and greedy token ids by transformers running the GGUF's weights
    (dequantised to float32) on a fixed chat prompt.
"""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ROOT / ".cache" / "models"
OUT = ROOT / "crates" / "mycel-ml" / "tests" / "data" / "reference.json"

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Peer-to-peer networks route inference to the best node.",
    "Zürich, 2024: naïve café owners sold 3.14159 kg of crème brûlée 😀",
    "short",
    "Content-addressed blobs are verified chunk by chunk against a BLAKE3 tree, "
    "so a single corrupted chunk is detected and fetched again from another holder.",
]

TOKENIZER_STRINGS = [
    "Hello world",
    "In 2024 the value was 3.14159",
    "don't won't they're",
    "spaces   and\n\nnewlines\t tabs",
    "Zürich naïve café 東京 😀",
    "<|im_start|>user\nHi<|im_end|>\n",
    "def f(x):\n\treturn x ** 2",
    "model.safetensors",
]

CHAT = [{"role": "user", "content": "What is a peer-to-peer network? Answer in two sentences."}]
GREEDY_TOKENS = 32


def main():
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import sentence_transformers
    import torch
    import transformers

    st = SentenceTransformer(str(MODELS / "all-minilm-l6-v2"), device="cpu")
    vectors = st.encode(SENTENCES, normalize_embeddings=True).tolist()

    gguf_dir = MODELS / "smollm2-135m-instruct"
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    token_ids = [tok.encode(s, add_special_tokens=False) for s in TOKENIZER_STRINGS]
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tok.eos_token_id,
        )
    greedy = out[0][len(prompt_ids):].tolist()

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "produced_by": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "script": "scripts/reference_values.py",
        },
        "minilm": {"sentences": SENTENCES, "embeddings": vectors},
        "smollm2": {
            "tokenizer": [{"text": s, "ids": ids} for s, ids in zip(TOKENIZER_STRINGS, token_ids)],
            "chat": CHAT,
            "prompt": prompt,
            "prompt_ids": prompt_ids,
            "greedy_ids": greedy,
            "greedy_text": tok.decode(greedy),
        },
    }, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
