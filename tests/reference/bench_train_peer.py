#!/usr/bin/env python3
"""The peers for build/train_cuda's throughput (optional tooling; the product never needs Python).

    python3 tests/reference/bench_train_peer.py [--preset small|large] [--batch B] [--seq T] [--steps 30]
                                                [--peers transformers,torchtitan,torchtitan-compile]

Trains, one after the other in this process, each peer at the shape of deepseek_v3.hpp's preset on random tokens,
with FP32 master weights and BF16 autocast (as build/train_cuda: FP32 master, BF16 GEMMs), AdamW (lr 1e-3,
betas 0.9/0.95, weight decay 0.1), gradient clipping at 1, and prints one JSON line per peer with the training
tokens/s over the timed steps (the first 3 are warm-up). No peer has MTP: build/train_cuda trains with it by
default, and `--mtp-depth 0` gives the peers' model.

  transformers        transformers' DeepseekV3ForCausalLM, PyTorch eager, attn_implementation="eager"
  torchtitan          torchtitan's DeepSeekV3Model (grouped-GEMM MoE through torch._grouped_mm, SDPA attention),
                      eager; torchtitan 0.2.2 with torch 2.11 (it also needs tyro, docstring-parser, typeguard,
                      torchdata 0.11 and tomli; the `datasets` package its __init__ files import is stubbed here)
  torchtitan-compile  the same model under torch.compile

Presets (Config::small() and Config::large() of the header):
  small  vocab 8192, d 512, 8 layers (1 dense, FFN 1536), 8 heads, 32 routed experts of width 256, top-4 in 2 of 4
         groups, 1 shared, q_lora 192, kv_lora 128, head dims 64 + 32, v 64; default batch 16 x 512
  large  vocab 32768, d 1024, 16 layers (1 dense, FFN 4096), 16 heads, 64 routed experts of width 512, top-6 in 4 of
         8 groups, 1 shared, q_lora 384, kv_lora 256, head dims 64 + 32, v 64; default batch 8 x 1024
A peer that cannot run (a package missing, out of memory) prints a JSON line with "error" and the next one runs.
"""
import argparse, importlib.util, json, sys, time, traceback, types

PRESETS = {
    "small": dict(vocab=8192, dim=512, inter=1536, moe_inter=256, layers=8, dense=1, heads=8, experts=32, shared=1,
                  top_k=4, groups=4, limited=2, q_lora=192, kv_lora=128, nope=64, rope=32, v=64, batch=16, seq=512),
    "large": dict(vocab=32768, dim=1024, inter=4096, moe_inter=512, layers=16, dense=1, heads=16, experts=64, shared=1,
                  top_k=6, groups=8, limited=4, q_lora=384, kv_lora=256, nope=64, rope=32, v=64, batch=8, seq=1024),
}
WARMUP = 3


def train(torch, model, loss_of, params, ids, steps):
    """Runs WARMUP + steps training steps; returns (seconds over the timed steps, last loss)."""
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    t0 = None
    for step in range(WARMUP + steps):
        if step == WARMUP:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, loss.item()


def transformers_peer(torch, s, seq):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    cfg = DeepseekV3Config(
        vocab_size=s["vocab"], hidden_size=s["dim"], intermediate_size=s["inter"], moe_intermediate_size=s["moe_inter"],
        num_hidden_layers=s["layers"], first_k_dense_replace=s["dense"], num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"], n_routed_experts=s["experts"], n_shared_experts=s["shared"],
        num_experts_per_tok=s["top_k"], n_group=s["groups"], topk_group=s["limited"], routed_scaling_factor=1.0,
        norm_topk_prob=True, q_lora_rank=s["q_lora"], kv_lora_rank=s["kv_lora"], qk_nope_head_dim=s["nope"],
        qk_rope_head_dim=s["rope"], v_head_dim=s["v"], max_position_embeddings=max(seq, 1024),
        num_nextn_predict_layers=0, tie_word_embeddings=False)
    model = DeepseekV3ForCausalLM(cfg).cuda().train()
    model.config._attn_implementation = "eager"
    # ids: [B, T + 1]; transformers shifts the labels itself, so it reads the first T tokens as input and labels
    return model, lambda m, ids: m(ids[:, :-1], labels=ids[:, :-1]).loss, "transformers DeepseekV3ForCausalLM, eager"


def stub_missing_modules():
    """torchtitan's package __init__ files import `datasets` (and the trainer tensorboard); its model uses neither."""
    def missing(name):
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):
            return False
    if missing("datasets"):
        ds = types.ModuleType("datasets")
        ds.Dataset = ds.IterableDataset = object
        ds.load_dataset = None
        dist = types.ModuleType("datasets.distributed")
        dist.split_dataset_by_node = None
        ds.distributed = dist
        sys.modules.update({"datasets": ds, "datasets.distributed": dist})
    if missing("tensorboard"):
        tb = types.ModuleType("torch.utils.tensorboard")
        tb.SummaryWriter = object
        sys.modules["torch.utils.tensorboard"] = tb


def torchtitan_peer(torch, s, seq, compile_model):
    stub_missing_modules()
    import torch.nn.functional as F
    from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
    from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
    from torchtitan.models.moe import MoEArgs
    # V3's router as the header's Config: sigmoid scores, normalised top-k gates, scale 1, group-limited routing;
    # load_balance_coeff > 0 turns on torchtitan's auxiliary-loss-free bias (the header's bias update, on by default)
    moe = MoEArgs(num_experts=s["experts"], num_shared_experts=s["shared"], score_func="sigmoid", route_norm=True,
                  route_scale=1.0, top_k=s["top_k"], num_expert_groups=s["groups"], num_limited_groups=s["limited"],
                  use_grouped_mm=True, load_balance_coeff=1e-3)
    ctx = max(seq, 1024)
    args = DeepSeekV3ModelArgs(
        max_seq_len=ctx, vocab_size=s["vocab"], dim=s["dim"], inter_dim=s["inter"], moe_inter_dim=s["moe_inter"],
        n_layers=s["layers"], n_dense_layers=s["dense"], n_heads=s["heads"], moe_args=moe, q_lora_rank=s["q_lora"],
        kv_lora_rank=s["kv_lora"], qk_nope_head_dim=s["nope"], qk_rope_head_dim=s["rope"], v_head_dim=s["v"],
        attn_type="sdpa", original_seq_len=ctx, rope_factor=1.0)
    args.moe_impl = "standard"   # what torchtitan's update_from_config would set from a job config
    with torch.device("cuda"):
        model = DeepSeekV3Model(args)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cuda"))
    model.train()
    run = torch.compile(model) if compile_model else model

    def loss_of(m, ids):
        logits = run(ids[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, s["vocab"]), ids[:, 1:].reshape(-1))
    import torchtitan
    version = getattr(torchtitan, "__version__", "")
    name = "torchtitan " + version + " DeepSeekV3Model, sdpa, " + ("torch.compile" if compile_model else "eager")
    return model, loss_of, name


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--batch", type=int, default=0, help="default: the preset's")
    p.add_argument("--seq", type=int, default=0, help="default: the preset's")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--peers", default="transformers,torchtitan,torchtitan-compile")
    a = p.parse_args()
    import torch
    s = PRESETS[a.preset]
    batch, seq = a.batch or s["batch"], a.seq or s["seq"]
    for peer in [x for x in a.peers.split(",") if x]:
        record = {"peer": peer, "preset": a.preset, "batch": batch, "seq": seq, "torch": torch.__version__,
                  "gpu": torch.cuda.get_device_name()}
        model = loss_of = params = None
        try:
            torch.manual_seed(0)
            if peer == "transformers":
                model, loss_of, name = transformers_peer(torch, s, seq)
            elif peer in ("torchtitan", "torchtitan-compile"):
                model, loss_of, name = torchtitan_peer(torch, s, seq, peer == "torchtitan-compile")
            else:
                raise ValueError("unknown peer " + repr(peer))
            ids = torch.randint(0, s["vocab"], (batch, seq + 1), device="cuda")
            params = list(model.parameters())
            seconds, loss = train(torch, model, loss_of, params, ids, a.steps)
            record.update(name=name, params=sum(x.numel() for x in params),
                          tokens_per_s=batch * seq * a.steps / seconds, loss=loss)
        except Exception as e:  # report and go on with the next peer
            record["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
        print(json.dumps(record), flush=True)
        model = loss_of = params = None   # free this peer's memory before the next one
        if peer == "torchtitan-compile":
            torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
