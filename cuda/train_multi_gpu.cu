// build/train_multi_gpu: data-parallel training of the header's model on every visible GPU, over peer copies, no NCCL
// (issue 8; header section 9 is the CPU reference, cuda/comm.cuh the transport).
//
//   build/train_multi_gpu [--preset tiny|small] [--steps 40] [--batch 32] [--seq 256] [--lr 1e-3] [--data FILE]
//
// Each GPU holds a replica of the model (built from the same seed) and, at every step, takes its consecutive share
// of the global batch (row_share): forward and backward on the GPU backend, gradients scaled by its share of the
// rows (the loss is a mean over tokens, so the full-batch gradient is Σ_r (B_r/B)·∇L_r), then ONE ring all-reduce of
// the flat gradient buffer over peer copies (cuda::device_all_reduce: the header's ring, bitwise the CPU's sums),
// the expert loads summed on the host (integers, exact) so that every replica makes the same loss-free bias update,
// and the same AdamW step everywhere: the replicas stay identical. The run is done twice, on 1 GPU and on all of
// them, with the same global batch, and prints tokens/s per GPU, the scaling, and the all-reduce bus bandwidth.
// (Expert parallelism on GPUs is not here yet: header section 9.4 runs on host buffers.)
#define DSV3_BACKEND_CUDA
// The header is host code; nvcc's front end does not know GCC's "#pragma GCC unroll" in it: silence that warning.
#pragma nv_diag_suppress 1675
#include "../deepseek_v3.hpp"
#include "comm.cuh"

#include <cstdio>
#include <string>

using namespace dsv3;

struct RunResult { double tokens_per_s = 0, allreduce_s = 0, allreduce_bytes = 0, last_loss = 0; };

static RunResult train_on(int world, const Config& cfg, const std::vector<int32_t>& data, int steps, int B, int T,
                          float lr) {
    dsv3::cuda::PeerGroup group(world, /*force_staging=*/false, /*verbose=*/world > 1);
    RunResult res;
    std::vector<double> loss_of(static_cast<size_t>(world));
    double seconds = 0;
    dsv3::cuda::run_gpu_ranks(group, [&](dsv3::cuda::PeerComm& comm) {
        const int r = comm.rank();
        Model model(cfg, 1);  // same seed on every rank: identical replicas
        AdamW opt;
        LrSchedule sched;
        sched.max_lr = lr; sched.min_lr = lr / 10; sched.warmup_steps = std::min(10, steps / 4); sched.total_steps = steps;
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
            for (auto& load : loads) all_reduce(comm, load.data(), load.size(), ReduceOp::sum);  // host ints: exact
            adamw_step(model, opt, sched.at(step));
            update_routing_bias(model, loads, cfg.bias_update_speed);
            double weighted = l.main * share.count / B;
            all_reduce(comm, &weighted, 1, ReduceOp::sum);
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
            else fail("unknown option '", k, "' (--preset, --steps, --batch, --seq, --lr, --data)");
        }
        if (preset != "tiny" && preset != "small") fail("--preset: unknown \"", preset, "\" (tiny or small)");
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
        if (B < gpus) fail("--batch ", B, " is smaller than the number of GPUs ", gpus);
        const RunResult one = train_on(1, cfg, data, steps, B, T, lr);
        std::printf("1 GPU: %.0f tokens/s\n\n", one.tokens_per_s);
        if (gpus < 2) {
            std::printf("only one GPU: no data-parallel run\n");
            return 0;
        }
        const RunResult all = train_on(gpus, cfg, data, steps, B, T, lr);
        const double bus = all.allreduce_bytes * 2.0 * (gpus - 1) / gpus / all.allreduce_s / 1e9;
        std::printf("%d GPUs: %.0f tokens/s in all, %.0f per GPU; scaling %.2fx over 1 GPU (target >= 1.8x for 2)\n",
                    gpus, all.tokens_per_s, all.tokens_per_s / gpus, all.tokens_per_s / one.tokens_per_s);
        std::printf("gradient all-reduce: %.1f MB per step, %.2f ms per step, bus bandwidth %.1f GB/s\n",
                    all.allreduce_bytes / (steps - 1) / 1e6, 1e3 * all.allreduce_s / (steps - 1), bus);
        std::printf("last loss: 1 GPU %.5f, %d GPUs %.5f (the same batches; sums in another order)\n", one.last_loss,
                    gpus, all.last_loss);
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
