#!/usr/bin/env python3
"""Decoding beside llama.cpp (optional tooling; the product never needs Python).

    python3 tests/reference/llama_cpp_peer.py greedy --llama-cpp DIR --model runs/tiny/hf [--prompt TEXT] [--tokens 64]
    python3 tests/reference/llama_cpp_peer.py speed  --llama-cpp DIR --model HF_DIR --context 512 [--tokens 64]

Converts a Hugging Face directory that this project wrote (build/train's runs/*/hf, dsv3::save_hf) to GGUF F32 with
llama.cpp's own converter (DIR/convert_hf_to_gguf.py), then
  greedy  continues the prompt greedily with llama.cpp (llama-simple) and with build/generate --temperature 0, and
          prints both texts and the number of leading tokens (bytes) on which they agree;
  speed   decodes --tokens tokens after a prompt of --context tokens, batch 1, on --threads threads (default 2), with
          llama.cpp (llama-cli; its "eval time" is decoding alone) and build/generate (its "decoding at" figure,
          after the prompt's prefill), and prints both tokens/s.
DIR is a llama.cpp source tree built beside the project (never committed), with llama-simple and llama-cli in
DIR/build/bin: cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-simple llama-cli. The converter
needs torch, numpy, transformers, tokenizers, safetensors, sentencepiece and pyyaml from PyPI.

The directory holds no tokenizer: the model's ids are bytes (vocab 256, build/train's default), so this script writes
a byte-level tokenizer.json beside a copy of it: id b is byte b, spelled in GPT-2's byte-to-character alphabet, with no
merges (llama.cpp's loader wants a merge list, so the GGUF gets one that no text uses: two NUL bytes). For a larger
vocabulary (the `small` preset with random weights: speed only) ids 256 and up are placeholder tokens that no text
produces. The converter names a BPE pre-tokenizer by hashing the ids of a test text and knows only
published tokenizers; with no merges the pre-tokenizer cannot change the ids, so the script tells it "gpt-2".
The copy's max_position_embeddings is raised to fit the prompt and --tokens (so that build/generate does not restart a
full context, which llama.cpp does not do), and a config without rope_scaling gets YaRN's keys with factor 1, plain
RoPE (llama.cpp's loader requires them for deepseek2); the weights are unchanged. --no-group-limit routes each token to
the top-k of all experts, in both programs: the llama.cpp tree of February 2025 ignores n_group and topk_group (V3's
group-limited routing), so with the limit the two programs choose different experts whenever the limit binds.
"""
import argparse, importlib.util, json, os, re, shutil, subprocess, sys, tempfile


def byte_alphabet():
    """GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for characters from U+0100 on."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    others = [b for b in range(256) if b not in keep]
    return {b: chr(b) if b in keep else chr(256 + others.index(b)) for b in range(256)}


def write_tokenizer(dst, vocab_size):
    chars = byte_alphabet()
    vocab = {chars[b]: b for b in range(256)}
    vocab.update({f"<unused{i}>": i for i in range(256, vocab_size)})
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": level, "post_processor": None, "decoder": level,
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                     "merges": []}}
    with open(os.path.join(dst, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False}, f)


def prepared_copy(model, work, positions, no_group_limit):
    """model's config.json and safetensors in work/hf, with the byte tokenizer (and room for `positions`)."""
    dst = os.path.join(work, "hf")
    os.makedirs(dst)
    for name in os.listdir(model):
        if name == "config.json" or name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
            shutil.copy(os.path.join(model, name), dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = max(positions, cfg["max_position_embeddings"])
    if no_group_limit:
        cfg["n_group"] = cfg["topk_group"] = 1
    if cfg.get("rope_scaling") is None:   # llama.cpp's deepseek2 loader requires YaRN's keys: factor 1 is plain RoPE
        cfg["rope_scaling"] = {"type": "yarn", "factor": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0,
                               "beta_slow": 1.0, "original_max_position_embeddings": cfg["max_position_embeddings"]}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_tokenizer(dst, cfg["vocab_size"])
    return dst


def convert(llama_cpp, hf, out):
    """llama.cpp's convert_hf_to_gguf.py in this process, with our tokenizer's hash answered as "gpt-2"."""
    sys.path.insert(0, os.path.join(llama_cpp, "gguf-py"))
    script = os.path.join(llama_cpp, "convert_hf_to_gguf.py")
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", script)
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    base = conv.TextModel if hasattr(conv, "TextModel") else conv.Model
    original = base.get_vocab_base_pre

    def pre(self, tokenizer):
        vocab, chars = tokenizer.get_vocab(), byte_alphabet()
        if all(vocab.get(chars[b]) == b for b in range(256)):   # ours: byte ids, no merges
            return "gpt-2"
        return original(self, tokenizer)

    base.get_vocab_base_pre = pre
    add_to_gguf = conv.gguf.SpecialVocab.add_to_gguf

    def with_a_merge(self, writer, *args, **kwargs):   # llama.cpp's loader needs merges: one no text uses (NUL NUL)
        self.merges = self.merges or ["\u0100 \u0100"]
        return add_to_gguf(self, writer, *args, **kwargs)

    conv.gguf.SpecialVocab.add_to_gguf = with_a_merge
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", "--outtype", "f32", "--outfile", out, hf]
    try:
        conv.main()
    finally:
        sys.argv = argv


def run(cmd, env=None):
    """stdout and stderr as bytes (a model's text need not be UTF-8)."""
    print("$", " ".join(c if len(c) < 80 else c[:40] + "..." for c in cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, env=env)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {cmd[0]}\n{p.stderr[-4000:].decode(errors='replace')}")
    return p.stdout, p.stderr


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["greedy", "speed"])
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source tree, built (DIR/build/bin)")
    ap.add_argument("--model", required=True, help="a Hugging Face directory written by this project")
    ap.add_argument("--generate", default="build/generate", help="our decoding program")
    ap.add_argument("--prompt", default="First Citizen:\nBefore we proceed any further, hear me speak.\n")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=512, help="speed: the prompt's length in tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-group-limit", action="store_true",
                    help="route both to the top-k of all experts (n_group = topk_group = 1 in the copy)")
    a = ap.parse_args()
    bin_dir = os.path.join(a.llama_cpp, "build", "bin")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    with tempfile.TemporaryDirectory() as work:
        positions = (a.context if a.mode == "speed" else len(a.prompt.encode())) + a.tokens + 8
        hf = prepared_copy(a.model, work, positions, a.no_group_limit)
        gguf = os.path.join(work, "model-f32.gguf")
        convert(a.llama_cpp, hf, gguf)
        if a.mode == "greedy":
            prompt = a.prompt.encode()
            out, _ = run([os.path.join(bin_dir, "llama-simple"), "-m", gguf, "-n", str(a.tokens), a.prompt])
            theirs = out[out.index(prompt) + len(prompt):] if prompt in out else out   # it echoes the prompt
            out, _ = run([a.generate, "--model", hf, "--prompt", a.prompt, "--tokens", str(a.tokens),
                          "--temperature", "0"], env)
            ours = out[len(prompt):].split(b"\n\n" + str(a.tokens).encode() + b" tokens in")[0]
            same = 0
            while same < min(len(ours), len(theirs)) and ours[same] == theirs[same]:
                same += 1
            print(json.dumps({"mode": "greedy", "tokens": a.tokens, "ours": ours.decode("latin-1"),
                              "llama.cpp": theirs[:len(ours)].decode("latin-1"), "same_leading_tokens": same}))
        else:
            text = (a.prompt * (a.context // len(a.prompt) + 1)).encode()[:a.context - 1].decode("latin-1")
            prompt_file = os.path.join(work, "prompt.txt")
            with open(prompt_file, "w", encoding="latin-1") as f:
                f.write(text)
            _, err = run([os.path.join(bin_dir, "llama-cli"), "-m", gguf, "-f", prompt_file, "-n", str(a.tokens),
                          "-t", str(a.threads), "-tb", str(a.threads), "-c", str(positions), "-b", "2048",
                          "--temp", "0", "-no-cnv", "--ignore-eos", "--no-warmup"])
            m = re.search(rb"eval time =\s*([\d.]+) ms /\s*(\d+) runs", err)
            theirs = int(m.group(2)) / (float(m.group(1)) / 1000)
            out, _ = run([a.generate, "--model", hf, "--prompt", text, "--tokens", str(a.tokens), "--temperature",
                          "0"], env)
            ours = float(re.search(rb"decoding at ([\d.]+) tokens/s", out).group(1))
            print(json.dumps({"mode": "speed", "context": a.context, "tokens": a.tokens, "threads": a.threads,
                              "ours_tokens_per_s": round(ours, 1), "llama.cpp_tokens_per_s": round(theirs, 1),
                              "ratio": round(ours / theirs, 3)}))


if __name__ == "__main__":
    main()
