// build/train_multi_gpu: data-parallel (and, with --ep, expert-parallel) training of the header's model on every
// visible GPU, over peer copies, no NCCL (header section 9 is the algorithm, cuda/comm.cuh the transport).
//
//   build/train_multi_gpu [--preset tiny|small] [--steps 40] [--batch 32] [--seq 256] [--lr 1e-3] [--data FILE] [--ep]
//                         [--fp8-dispatch] [--ranks R]   (default: one rank per visible GPU; more ranks than GPUs share
//                         them, for tests)
//
// Each GPU holds a replica of the model (built from the same seed) and, at every step, takes its consecutive share
// of the global batch (row_share): forward and backward on the GPU backend, gradients scaled by its share of the
// rows (the loss is a mean over tokens, so the full-batch gradient is Σ_r (B_r/B)·∇L_r), then ONE ring all-reduce of
// the flat gradient buffer over peer copies (cuda::device_all_reduce: the header's ring, bitwise the CPU's sums),
// the expert loads summed on the host (integers, exact) so that every replica makes the same loss-free bias update,
// and the same AdamW step everywhere: the replicas stay identical. The run is done twice, on 1 GPU and on all of
// them, with the same global batch, and prints tokens/s per GPU, the scaling, and the all-reduce bus bandwidth.
// With --ep the multi-GPU run is DP × EP instead: the header's parallel_train_step (section 9.5) with its
// ExpertParallel runner (9.4) on the GPU backend. Each GPU owns 1/R of every MoE layer's routed experts; tokens are
// dispatched to the GPUs owning their chosen experts and the outputs combined back (backend::all_to_all =
// cuda::all_to_all over peer copies); the replicated gradients are all-reduced. It prints the dispatch/combine
// traffic and bandwidth next to the throughput, and the losses next to the 1-GPU run's (the same batches).
// --fp8-dispatch (with --ep) sends the dispatch in FP8 as V3 does (§3.3.3; the header's ExpertParallel::fp8_dispatch)
// and prints its bytes against BF16's. The packing runs on the host (the rows are copied there and back), so its
// time is not yet the GPU's: a device-side pack with cuda/fp8.cuh's 1x128 quantizer is the follow-up.
#define DSV3_BACKEND_CUDA
// The header is host code; nvcc's front end does not know GCC's "#pragma GCC unroll" in it: silence that warning.
#pragma nv_diag_suppress 1675
#include "../deepseek_v3.hpp"
#include "comm.cuh"

#include <cstdio>
#include <string>

using namespace dsv3;

struct RunResult {
    double tokens_per_s = 0, allreduce_s = 0, allreduce_bytes = 0, last_loss = 0;
    double moved_bytes = 0, moving_s = 0;   // --ep: rank 0's dispatch/combine traffic over the timed steps
    double dispatch_bytes = 0, dispatch_rows = 0;   // --ep: of it, the dispatched token rows (bytes on the wire)
};

// Cosine from lr to lr/10 after a short warm-up, the same for every run compared here.
static LrSchedule schedule(float lr, int steps) {
    LrSchedule s;
    s.max_lr = lr; s.min_lr = lr / 10; s.warmup_steps = std::min(10, steps / 4); s.total_steps = steps;
    return s;
}

// One rank's DP × EP training (--ep): the header's parallel step, every byte through backend::all_to_all/all_reduce.
static void train_rank_ep(dsv3::cuda::PeerComm& comm, const Config& cfg, const std::vector<int32_t>& data, int steps,
                          int B, int T, float lr, bool fp8_dispatch, RunResult& res, std::vector<double>& loss_of,
                          double& seconds) {
    const int r = comm.rank(), world = comm.world_size();
    Model model(cfg, 1);
    AdamW opt;
    const LrSchedule sched = schedule(lr, steps);
    ExpertParallel ep(comm, cfg);
    ep.fp8_dispatch = fp8_dispatch;
    std::vector<int32_t> batch(size_t(B) * (T + 1));
    const RowShare share = row_share(B, world, r);
    double t_start = 0;
    for (int step = 0; step < steps; ++step) {
        if (step == 1) {
            comm.barrier();
            t_start = now_seconds();
            ep.stats = {};
        }
        sample_batch(data, B, T, 1, step, batch.data());
        const StepResult s = parallel_train_step(comm, model, opt, batch.data() + size_t(share.first) * (T + 1),
                                                 share.count, T, sched.at(step), LossOptions{}, &ep);
        loss_of[size_t(r)] = s.loss.main;
        if (r == 0 && (step % 10 == 0 || step + 1 == steps))
            std::printf("  %d GPUs DPxEP  step %3d/%d  loss %.4f\n", world, step + 1, steps, s.loss.main);
    }
    DSV3_CUDA_CHECK(cudaDeviceSynchronize());
    comm.barrier();
    if (r == 0) {
        seconds = now_seconds() - t_start;
        res.moved_bytes = double(ep.stats.bytes_moved);
        res.moving_s = ep.stats.seconds_moving;
        res.dispatch_bytes = double(ep.stats.dispatch_bytes);
        res.dispatch_rows = double(ep.stats.dispatched_rows);
    }
}

static RunResult train_on(int world, const Config& cfg, const std::vector<int32_t>& data, int steps, int B, int T,
                          float lr, bool expert_parallel = false, bool fp8_dispatch = false) {
    dsv3::cuda::PeerGroup group(world, /*force_staging=*/false, /*verbose=*/world > 1);
    RunResult res;
    std::vector<double> loss_of(static_cast<size_t>(world));
    double seconds = 0;
    dsv3::cuda::run_gpu_ranks(group, [&](dsv3::cuda::PeerComm& comm) {
        if (expert_parallel)
            return train_rank_ep(comm, cfg, data, steps, B, T, lr, fp8_dispatch, res, loss_of, seconds);
        const int r = comm.rank();
        Model model(cfg, 1);  // same seed on every rank: identical replicas
        AdamW opt;
        const LrSchedule sched = schedule(lr, steps);
        std::vector<int32_t> batch(size_t(B) * (T + 1));
        const RowShare share = row_share(B, world, r);
        const size_t n = model.params.size();
        double t_start = 0, t_allreduce = 0;
        for (int step = 0; step < steps; ++step) {
            if (step == 1) {  // the first step (allocation, cuBLAS warm-up) is not timed
                comm.barrier();
                t_start = now_seconds();
            }
            sample_batch(data, B, T, 1, step, batch.data());  // the global batch, the same on every rank
            const Losses l = model.forward_backward(batch.data() + size_t(share.first) * (T + 1), share.count, T);
            backend::scale_inplace(model.grads.data(), int64_t(n), float(share.count) / float(B));
            DSV3_CUDA_CHECK(cudaDeviceSynchronize());  // the gradients are complete before the comm stream reads them
            const double t0 = now_seconds();
            dsv3::cuda::device_all_reduce(comm, model.grads.data(), n, ReduceOp::sum);
            comm.synchronize();
            if (step >= 1) t_allreduce += now_seconds() - t0;
            std::vector<std::vector<int64_t>> loads = model.expert_loads();
            for (auto& load : loads) dsv3::all_reduce(comm, load.data(), load.size(), ReduceOp::sum);  // host ints: exact
            adamw_step(model, opt, sched.at(step));
            update_routing_bias(model, loads, cfg.bias_update_speed);
            double weighted = l.main * share.count / B;
            dsv3::all_reduce(comm, &weighted, 1, ReduceOp::sum);
            loss_of[size_t(r)] = weighted;
            if (r == 0 && (step % 10 == 0 || step + 1 == steps))
                std::printf("  %d GPU%s  step %3d/%d  loss %.4f\n", world, world > 1 ? "s" : "", step + 1, steps, weighted);
        }
        DSV3_CUDA_CHECK(cudaDeviceSynchronize());
        comm.barrier();
        if (r == 0) {
            seconds = now_seconds() - t_start;
            res.allreduce_s = t_allreduce;
            res.allreduce_bytes = double(n) * sizeof(float) * (steps - 1);
        }
    });
    res.tokens_per_s = double(B) * T * (steps - 1) / seconds;
    res.last_loss = loss_of[0];
    return res;
}

int main(int argc, char** argv) {
    try {
        std::string preset = "small", data_path;
        int steps = 40, B = 32, T = 256;
        bool expert_parallel = false, fp8_dispatch = false;
        int ranks = 0;
        float lr = 1e-3f;
        for (int i = 1; i < argc; ++i) {
            const std::string k = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) fail("option ", k, " needs a value");
                return argv[++i];
            };
            if (k == "--preset") preset = value();
            else if (k == "--steps") steps = std::stoi(value());
            else if (k == "--batch") B = std::stoi(value());
            else if (k == "--seq") T = std::stoi(value());
            else if (k == "--lr") lr = std::stof(value());
            else if (k == "--data") data_path = value();
            else if (k == "--ep") expert_parallel = true;
            else if (k == "--fp8-dispatch") fp8_dispatch = true;
            else if (k == "--ranks") ranks = std::stoi(value());
            else fail("unknown option '", k, "' (--preset, --steps, --batch, --seq, --lr, --data, --ep, "
                      "--fp8-dispatch, --ranks)");
        }
        if (preset != "tiny" && preset != "small") fail("--preset: unknown \"", preset, "\" (tiny or small)");
        if (fp8_dispatch && !expert_parallel) fail("--fp8-dispatch needs --ep (it is the expert-parallel dispatch)");
        Config cfg = preset == "small" ? Config::small() : Config::tiny();
        if (T > cfg.max_seq_len) fail("--seq ", T, " exceeds the preset's max_seq_len ", cfg.max_seq_len);
        cfg.max_seq_len = T;
        if (steps < 2) fail("--steps must be >= 2 (the first step is not timed)");
        int gpus = 0;
        DSV3_CUDA_CHECK(cudaGetDeviceCount(&gpus));
        std::string source;
        const std::vector<int32_t> data = training_bytes(data_path, &source);
        std::printf("data: %s | preset %s | global batch %d x %d | %d GPU%s visible\n", source.c_str(), preset.c_str(), B,
                    T, gpus, gpus > 1 ? "s" : "");
        const int R = ranks > 0 ? ranks : gpus;   // ranks beyond the GPU count share GPUs (rank r on GPU r mod G)
        if (B < R) fail("--batch ", B, " is smaller than the number of ranks ", R);
        const RunResult one = train_on(1, cfg, data, steps, B, T, lr);
        std::printf("1 GPU: %.0f tokens/s\n\n", one.tokens_per_s);
        if (R < 2) {
            std::printf("only one GPU: no parallel run (--ranks 2 runs two ranks on it)\n");
            return 0;
        }
        const std::string on = std::to_string(R) + " ranks on " + std::to_string(std::min(R, gpus)) + " GPU" +
                                (std::min(R, gpus) > 1 ? "s" : "");
        if (expert_parallel) {
            if (B % R != 0) fail("--ep needs --batch divisible by the ", R, " ranks, found ", B);
            const RunResult all = train_on(R, cfg, data, steps, B, T, lr, true, fp8_dispatch);
            std::printf("%s, DP x EP: %.0f tokens/s in all, %.0f per rank; %.2fx over 1 GPU\n", on.c_str(),
                        all.tokens_per_s, all.tokens_per_s / R, all.tokens_per_s / one.tokens_per_s);
            std::printf("dispatch/combine (rank 0): %.1f MB per step, %.2f ms per step, %.1f GB/s\n",
                        all.moved_bytes / (steps - 1) / 1e6, 1e3 * all.moving_s / (steps - 1),
                        all.moved_bytes / std::max(all.moving_s, 1e-12) / 1e9);
            const double bf16 = all.dispatch_rows * 2.0 * cfg.dim;   // the same rows in BF16
            std::printf("dispatch (rank 0, %s): %.2f MB per step, %.3f of BF16's %.2f MB\n",
                        fp8_dispatch ? "FP8, 1x128 power-of-two scales" : "FP32",
                        all.dispatch_bytes / (steps - 1) / 1e6, all.dispatch_bytes / std::max(bf16, 1.0),
                        bf16 / (steps - 1) / 1e6);
            std::printf("last loss: 1 GPU %.5f, %s DP x EP %.5f (the same batches)\n", one.last_loss, on.c_str(),
                        all.last_loss);
            return 0;
        }
        const RunResult all = train_on(R, cfg, data, steps, B, T, lr);
        const double bus = all.allreduce_bytes * 2.0 * (R - 1) / R / all.allreduce_s / 1e9;
        std::printf("%s: %.0f tokens/s in all, %.0f per rank; scaling %.2fx over 1 GPU (target >= 1.8x for 2 GPUs)\n",
                    on.c_str(), all.tokens_per_s, all.tokens_per_s / R, all.tokens_per_s / one.tokens_per_s);
        std::printf("gradient all-reduce: %.1f MB per step, %.2f ms per step, bus bandwidth %.1f GB/s\n",
                    all.allreduce_bytes / (steps - 1) / 1e6, 1e3 * all.allreduce_s / (steps - 1), bus);
        std::printf("last loss: 1 GPU %.5f, %s %.5f (the same batches; sums in another order)\n", one.last_loss,
                    on.c_str(), all.last_loss);
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
