#!/usr/bin/env python3
"""Reference data for deepseek_v3.hpp from Hugging Face transformers' DeepseekV3ForCausalLM (optional tooling).

    pip install torch transformers numpy safetensors
    python tests/reference/make_reference.py --out tests/reference

builds small random float32 DeepseekV3ForCausalLM models (query LoRA on and off, YaRN on and off, a random non-zero
routing bias e_score_correction_bias, random RMSNorm gains) and writes, for each case, tests/reference/<case>/:

    config.json, model.safetensors   the model (save_pretrained; expert weights under their per-expert names)
    tokens.txt                       the token rows, "1,2,3;4,5,6" (the --tokens syntax of build/hf_logits)
    logits.npy                       float32 [B, T, vocab]: model(input_ids).logits
    loss.txt                         model(input_ids, labels=input_ids).loss: mean next-token cross-entropy
    grads.safetensors                F32 gradients of that loss for every parameter, under the HF names

(about 1 MB in all). tests/test_io.cpp loads every such case with dsv3::load_hf and checks our logits, loss and
gradients against these files; build/hf_logits --model tests/reference/<case> ... computes the same.

The other direction, a directory written by our dsv3::save_hf (which adds DeepSeek's MTP layer and its copies of the
embedding and head):

    build/hf_logits --model DIR --tokens "1,2,3;4,5,6" --out ours.npy --grads ours.safetensors
    python tests/reference/make_reference.py --check-ours DIR --tokens "1,2,3;4,5,6" \\
        --ours-logits ours.npy --ours-grads ours.safetensors

loads DIR with transformers (which must find every weight and may only leave out the MTP layers), and compares its
logits (and gradients) with ours. Exit status 0 when they agree.

Known differences between transformers and DeepSeek's own code that the cases are built to avoid (see the report in
the repository's notes): transformers masks the experts of non-selected groups with 0.0 instead of -inf before its
top-k, which changes the choice only when a biased score s + b is negative, so the cases draw the bias from [0, 0.1);
and routing ties: every case checks that no token's choice of group or expert is within 1e-4 of a tie.
Works with transformers 4.5x (per-expert ModuleList) and 5.x (fused expert tensors, split back to per-expert names).
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

# Small but realistic for our code: one dense layer then MoE layers, 8 experts in 2 groups (1 kept), top-2, a shared
# expert, MLA with (optional) query LoRA. moe_intermediate_size is not half of hidden_size so that fused expert tensors
# ([E, 2I, H]) have an unambiguous orientation.
BASE = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=12,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=16, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64, rope_theta=10000.0,
    rms_norm_eps=1e-6, initializer_range=0.1, tie_word_embeddings=False, attention_bias=False,
    rope_interleave=True, hidden_act="silu",
)
# YaRN with max_position_embeddings == factor * original_max_position_embeddings: transformers 4.5x derives the factor
# from that ratio, later versions use "factor"; consistent values make every version agree. mscale == mscale_all_dim
# keeps transformers' cos/sin factor at 1 (DeepSeek's configs do the same).
YARN = dict(type="yarn", rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
            beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)
CASES = {
    "q_lora": dict(),
    "no_q_lora": dict(q_lora_rank=None),
    "q_lora_yarn": dict(rope_scaling=YARN),
    "no_q_lora_yarn": dict(q_lora_rank=None, rope_scaling=YARN),
}
B, T = 2, 8


def make_config(overrides):
    d = dict(BASE)
    d.update(overrides)
    d.setdefault("rope_scaling", None)
    return DeepseekV3Config(**d)


def moe_modules(model):
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]


def routing_margin(model, config, input_ids):
    """Smallest gap, over tokens and MoE layers, between a chosen and a rejected group or expert (in biased score)."""
    captured = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: captured.append((mod, args[0].detach())))
             for m in moe_modules(model)]
    with torch.no_grad():
        model(input_ids)
    for h in hooks:
        h.remove()
    E, G, kg, K = config.n_routed_experts, config.n_group, config.topk_group, config.num_experts_per_tok
    margin = math.inf
    with torch.no_grad():
        for mod, x in captured:
            margin = min(margin, _margin_of(mod, x, E, G, kg, K))
    return margin


def _margin_of(mod, x, E, G, kg, K):
    """Routing margin of one MoE layer for the tokens x: [tokens, hidden] (transformers' selection, recomputed)."""
    x = x.reshape(-1, x.shape[-1]).float()
    s = torch.sigmoid(x @ mod.gate.weight.float().T)
    b = s + mod.gate.e_score_correction_bias.float()
    assert float(b.min()) > 0, "a negative biased score: transformers' 0.0 group mask would differ from -inf"
    group = b.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)   # group score: sum of its two best
    ranked = group.sort(dim=-1, descending=True)
    margin = math.inf
    if G > kg:
        margin = min(margin, float((ranked.values[:, kg - 1] - ranked.values[:, kg]).min()))
    keep = torch.zeros_like(group, dtype=torch.bool).scatter_(1, ranked.indices[:, :kg], True)
    allowed = b.masked_fill(~keep.repeat_interleave(E // G, dim=1), -math.inf).sort(dim=-1, descending=True).values
    if kg * (E // G) > K:
        margin = min(margin, float((allowed[:, K - 1] - allowed[:, K]).min()))
    return margin


def per_expert(named, config):
    """{name: tensor} with transformers 5's fused experts (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I])
    split back into the checkpoint names mlp.experts.{e}.{gate,up,down}_proj.weight."""
    out = {}
    H = config.hidden_size
    for name, t in named.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            if t.shape[2] != H:  # a transposed layout [E, H, 2I]
                t = t.transpose(1, 2)
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            if t.shape[1] != H:  # transposed [E, I, H]
                t = t.transpose(1, 2)
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[name] = t.contiguous()
    return out


def build_case(name, overrides, out_dir, seed):
    config = make_config(overrides)
    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, config.vocab_size, (B, T), generator=gen)
    for attempt in range(20):
        torch.manual_seed(seed + 1000 * attempt)
        model = DeepseekV3ForCausalLM._from_config(config, attn_implementation="eager").float().eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):  # RMSNorm gains: not all ones, so each one matters
                    p.add_(0.1 * torch.randn_like(p))
            for mod in moe_modules(model):
                mod.gate.e_score_correction_bias.copy_(0.1 * torch.rand_like(mod.gate.e_score_correction_bias))
        margin = routing_margin(model, config, input_ids)
        if margin > 1e-4:
            break
        print(f"  {name}: routing margin {margin:.2e} too close to a tie, reseeding")
    else:
        sys.exit(f"{name}: no seed without near-ties in routing")

    case = os.path.join(out_dir, name)
    shutil.rmtree(case, ignore_errors=True)
    model.save_pretrained(case, safe_serialization=True)
    # Normalise the weights file: per-expert names (transformers 5 may save fused experts), one file, F32.
    weights = {}
    for fname in sorted(os.listdir(case)):
        if fname.endswith(".safetensors"):
            weights.update(load_file(os.path.join(case, fname)))
            os.remove(os.path.join(case, fname))
    for fname in ("model.safetensors.index.json", "generation_config.json"):
        if os.path.exists(os.path.join(case, fname)):
            os.remove(os.path.join(case, fname))
    weights = {k: v.float() for k, v in per_expert(weights, config).items()}
    save_file(weights, os.path.join(case, "model.safetensors"), metadata={"format": "pt"})

    model.zero_grad()
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float()
             for n, p in model.named_parameters()}
    save_file(per_expert(grads, config), os.path.join(case, "grads.safetensors"), metadata={"format": "pt"})
    np.save(os.path.join(case, "logits.npy"), out.logits.detach().float().numpy().astype(np.float32))
    with open(os.path.join(case, "loss.txt"), "w") as f:
        f.write(f"{out.loss.item():.9g}\n")
    with open(os.path.join(case, "tokens.txt"), "w") as f:
        f.write(";".join(",".join(str(int(t)) for t in row) for row in input_ids) + "\n")
    # The saved file must hold exactly the model's weights under their checkpoint names.
    expected = set(per_expert(dict(model.state_dict()), config))
    assert set(weights) == expected, sorted(set(weights) ^ expected)[:10]
    print(f"  {name}: loss {out.loss.item():.6f}, routing margin {margin:.2e}, {len(weights)} tensors")


def compare(name, ours, ref, rel_tol):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        print(f"FAIL {name}: shape {ours.shape} vs transformers {ref.shape}")
        return False
    err = float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))
    ok = err <= rel_tol or float(np.abs(ours - ref).max()) <= 1e-7
    if not ok:
        print(f"FAIL {name}: relative error {err:.3e} (max abs {float(np.abs(ours - ref).max()):.3e})")
    return ok


def check_ours(args):
    import transformers
    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in 5
    model, info = DeepseekV3ForCausalLM.from_pretrained(os.path.abspath(args.check_ours), attn_implementation="eager",
                                                        output_loading_info=True, **{dtype_arg: torch.float32})
    model = model.float().eval()
    n = model.config.num_hidden_layers
    missing = list(info.get("missing_keys", []))
    unexpected = list(info.get("unexpected_keys", []))
    print(f"transformers loaded {args.check_ours}: {len(missing)} missing, {len(unexpected)} unexpected keys")
    beyond = lambda k: k.startswith("model.layers.") and int(k.split(".")[2]) >= n
    bad_unexpected = [k for k in unexpected if not beyond(k)]
    ok = not missing and not bad_unexpected
    if missing:
        print("FAIL missing:", missing[:10])
    if bad_unexpected:
        print("FAIL unexpected keys that are not MTP layers:", bad_unexpected[:10])
    if info.get("mismatched_keys"):
        print("FAIL mismatched:", info["mismatched_keys"][:10])
        ok = False
    rows = [[int(t) for t in r.split(",") if t.strip()] for r in args.tokens.split(";")]
    input_ids = torch.tensor(rows)
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    print(f"transformers loss {out.loss.item():.6f}")
    ok &= compare("logits", np.load(args.ours_logits), out.logits.detach().numpy(), 1e-5)
    if args.ours_grads:
        ours = load_file(args.ours_grads)
        theirs = per_expert({k: p.grad if p.grad is not None else torch.zeros_like(p)
                             for k, p in model.named_parameters()}, model.config)
        if set(ours) != set(theirs):
            print("FAIL gradient names differ:", sorted(set(ours) ^ set(theirs))[:10])
            ok = False
        for k in sorted(set(ours) & set(theirs)):
            ok &= compare(f"grad {k}", ours[k].numpy(), theirs[k].detach().numpy(), 1e-4)
    print("OK: ours and transformers agree" if ok else "MISMATCH")
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="directory for the reference cases (tests/reference)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-ours", metavar="DIR", help="a directory written by dsv3::save_hf")
    p.add_argument("--tokens", help="token rows for --check-ours, as given to build/hf_logits")
    p.add_argument("--ours-logits", help="logits.npy written by build/hf_logits")
    p.add_argument("--ours-grads", help="grads.safetensors written by build/hf_logits --grads")
    args = p.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if args.check_ours:
        if not (args.tokens and args.ours_logits):
            p.error("--check-ours needs --tokens and --ours-logits")
        return check_ours(args)
    if not args.out:
        p.error("give --out DIR (generate) or --check-ours DIR (compare)")
    import transformers
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    os.makedirs(args.out, exist_ok=True)
    for i, name in enumerate(args.cases.split(",")):
        build_case(name, CASES[name], args.out, args.seed + 17 * i)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(args.out) for f in fs)
    print(f"{total / 1e6:.2f} MB under {args.out}")
    if total > 2e6:
        sys.exit("reference data above 2 MB: make the cases smaller")
    return 0


if __name__ == "__main__":
    sys.exit(main())
