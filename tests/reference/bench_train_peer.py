#!/usr/bin/env python3
"""The peer for build/train_cuda's throughput (optional tooling; the product never needs Python).

    python3 tests/reference/bench_train_peer.py [--batch 16] [--seq 512] [--steps 30]

Trains transformers' DeepseekV3ForCausalLM (PyTorch eager, attn_implementation="eager") with the shape of
deepseek_v3.hpp's `small` preset (Config::small(): vocab 8192, d 512, 8 layers (1 dense), 8 heads, 32 routed experts
of width 256, top-4 in 2 of 4 groups, 1 shared, q_lora 192, kv_lora 128, head dims 64 + 32, v 64; no MTP: transformers
has none) on random tokens, with FP32 master weights and BF16 autocast (as build/train_cuda: FP32 master, BF16 GEMMs),
AdamW, and prints the training tokens/s over the timed steps (the first 3 are warm-up) as one JSON line.
"""
import argparse, json, time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    cfg = DeepseekV3Config(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
        n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=1.0, norm_topk_prob=True, q_lora_rank=192, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=1024,
        num_nextn_predict_layers=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).cuda().train()
    model.config._attn_implementation = "eager"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device="cuda")
    warmup = 3
    for step in range(warmup + a.steps):
        if step == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(json.dumps({"peer": "transformers DeepseekV3ForCausalLM, PyTorch eager, BF16 autocast",
                      "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                      "tokens_per_s": a.batch * a.seq * a.steps / seconds, "loss": loss.item()}))


if __name__ == "__main__":
    main()
