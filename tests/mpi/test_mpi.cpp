// build/test_mpi: header section 9 with ranks as MPI processes (MpiCommunicator, section 9.3b), against the same
// computations on thread ranks (run_ranks, in this process) and on one rank. `make mpi` builds it; tests/mpi/run.sh
// runs it under mpirun with 2 and 4 processes.
//
//   mpirun -np R build/test_mpi              the checks (R = 2 or 4); rank 0 prints the summary; exit status 0 = passed
//   mpirun -np R build/test_mpi fail-throw   one rank throws while the others wait in an all-reduce
//   mpirun -np R build/test_mpi fail-size    one rank sends 8 bytes where 16 are expected
//   mpirun -np R build/test_mpi fail-long    one rank sends 32 bytes where 16 are expected (MPI truncates)
//                                            (each fail-* must end the whole job with the rank's error, not hang)
//   mpirun -np R build/test_mpi bench        all-reduce and all-to-all times, MPI processes against thread ranks
//                                            (add --bind-to none: else the thread ranks share rank 0's one core)
//
// What is bitwise and what is tolerance: MPI ranks run the same code on the same bytes as thread ranks, so every
// result is BITWISE the thread ranks' result for the same R (collectives, DP, EP, DP x EP). Against one rank on the
// whole batch, EP's forward/backward is bitwise (as on thread ranks) and DP / DP x EP training agree within the
// tolerance of tests/test_parallel.cpp (1e-3 of lr·steps per parameter: the sums over tokens run in another order).
#include <chrono>
#include <string>
#include <thread>

#include "../parallel_helpers.hpp"

using namespace parallel_test;

namespace {

int g_rank = 0, g_checks = 0, g_failures = 0;

void check(bool ok, const std::string& what) {
    ++g_checks;
    if (ok) return;
    ++g_failures;
    std::fprintf(stderr, "FAILED (rank %d): %s\n", g_rank, what.c_str());
}

// Every rank's vector, on every rank (test plumbing, straight MPI: the code under test is the Communicator).
template <class T>
std::vector<std::vector<T>> gather_all(const std::vector<T>& mine) {
    int R = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &R);
    std::vector<int> bytes(static_cast<size_t>(R)), at(static_cast<size_t>(R) + 1, 0);
    const int my_bytes = int(mine.size() * sizeof(T));
    MPI_Allgather(&my_bytes, 1, MPI_INT, bytes.data(), 1, MPI_INT, MPI_COMM_WORLD);
    for (int q = 0; q < R; ++q) at[size_t(q) + 1] = at[size_t(q)] + bytes[size_t(q)];
    std::vector<char> all(static_cast<size_t>(at[size_t(R)]));
    MPI_Allgatherv(mine.data(), my_bytes, MPI_BYTE, all.data(), bytes.data(), at.data(), MPI_BYTE, MPI_COMM_WORLD);
    std::vector<std::vector<T>> out(static_cast<size_t>(R));
    for (int q = 0; q < R; ++q) {
        out[size_t(q)].resize(size_t(bytes[size_t(q)]) / sizeof(T));
        std::memcpy(out[size_t(q)].data(), all.data() + at[size_t(q)], size_t(bytes[size_t(q)]));
    }
    return out;
}

std::string str(int R, const char* what) { return "R=" + std::to_string(R) + ": " + what; }

// --- the collectives -------------------------------------------------------------------------------------------------
void test_collectives(Communicator& comm) {
    const int R = comm.world_size(), r = comm.rank();
    for (size_t n : {size_t(0), size_t(1), size_t(3), size_t(7), size_t(1000), size_t(1001)}) {
        auto input = [&](int q, size_t i) { return float(Rng(uint64_t(q) * 7919 + i).normal()); };
        auto run = [&](Communicator& c, std::vector<float>& x, std::vector<float>& xm, std::vector<int64_t>& xi) {
            x.resize(n), xm.resize(n), xi.resize(n);
            for (size_t i = 0; i < n; ++i) xm[i] = x[i] = input(c.rank(), i), xi[i] = int64_t(c.rank() * 1000 + i);
            all_reduce(c, x.data(), n);
            all_reduce(c, xm.data(), n, ReduceOp::mean);
            all_reduce(c, xi.data(), n);
        };
        std::vector<float> x, xm;
        std::vector<int64_t> xi;
        run(comm, x, xm, xi);
        std::vector<float> tx, txm;
        std::vector<int64_t> txi;
        run_ranks(R, [&](Communicator& c) {
            std::vector<float> a, b;
            std::vector<int64_t> d;
            run(c, a, b, d);
            if (c.rank() == r) tx = a, txm = b, txi = d;
        });
        const std::string what = "all_reduce n=" + std::to_string(n) + " bitwise = thread ranks";
        check(bitwise_equal(x.data(), tx.data(), n) && bitwise_equal(xm.data(), txm.data(), n) && xi == txi,
              str(R, what.c_str()));
        int64_t sum_int = 0;
        for (int q = 0; q < R; ++q) sum_int += q * 1000 + int64_t(n ? n - 1 : 0);
        check(n == 0 || xi[n - 1] == sum_int, str(R, "all_reduce of integers: the exact sum"));
    }
    // all-to-all, uneven and empty counts: rows of 3 from every rank to every rank
    const int row = 3;
    auto rows = [](int src, int dst) { return int64_t((src * 7 + dst * 3) % 5); };
    auto value = [](int src, int dst, int64_t i, int j) { return int32_t(src * 100000 + dst * 1000 + i * 10 + j); };
    auto exchange = [&](Communicator& c) {
        std::vector<int64_t> counts(static_cast<size_t>(R));
        std::vector<int32_t> send;
        for (int q = 0; q < R; ++q) {
            counts[size_t(q)] = rows(c.rank(), q);
            for (int64_t i = 0; i < counts[size_t(q)]; ++i)
                for (int j = 0; j < row; ++j) send.push_back(value(c.rank(), q, i, j));
        }
        const std::vector<int64_t> recv_counts = exchange_counts(c, counts);
        std::vector<int32_t> recv(size_t(std::accumulate(recv_counts.begin(), recv_counts.end(), int64_t(0)) * row));
        all_to_all(c, send.data(), counts, row, recv.data(), recv_counts);
        return recv;
    };
    const std::vector<int32_t> got = exchange(comm);
    std::vector<int32_t> want, threads;
    for (int q = 0; q < R; ++q)  // grouped by source rank, in rank order
        for (int64_t i = 0; i < rows(q, r); ++i)
            for (int j = 0; j < row; ++j) want.push_back(value(q, r, i, j));
    run_ranks(R, [&](Communicator& c) {
        std::vector<int32_t> v = exchange(c);
        if (c.rank() == r) threads = v;
    });
    check(got == want, str(R, "all_to_all: every row from its source, in rank order"));
    check(got == threads, str(R, "all_to_all = thread ranks"));
    comm.barrier();
}

// --- training: DP and DP x EP over 3 AdamW steps -------------------------------------------------------------------
void test_training(Communicator& comm, bool with_ep) {
    const int R = comm.world_size(), T = 8, steps = 3;
    for (int B : with_ep ? std::vector<int>{8} : std::vector<int>{4, 6}) {  // DP: 6 rows on 4 ranks are uneven shares
        const Config c = with_ep ? parallel_config(R, R / 2) : parallel_config(4, 2);
        const std::string name = std::string(with_ep ? "DP x EP" : "DP") + " B=" + std::to_string(B) + ": ";
        const Trained mine = train_rank(comm, c, B, T, steps, with_ep);
        std::vector<Trained> mpi(static_cast<size_t>(R)), threads(static_cast<size_t>(R));
        const std::vector<std::vector<float>> params = gather_all(mine.params);
        const std::vector<std::vector<double>> losses = gather_all(mine.losses);
        for (int q = 0; q < R; ++q) {
            mpi[size_t(q)].params = params[size_t(q)];
            mpi[size_t(q)].losses = losses[size_t(q)];
        }
        run_ranks(R, [&](Communicator& t) { threads[size_t(t.rank())] = train_rank(t, c, B, T, steps, with_ep); });
        bool same = true;  // every rank's own parameters and losses, before any assembly
        for (int q = 0; q < R; ++q)
            same &= bitwise_equal(mpi[size_t(q)].params.data(), threads[size_t(q)].params.data(), mine.params.size()) &&
                    mpi[size_t(q)].losses == threads[size_t(q)].losses;
        check(same, str(R, (name + "every rank bitwise = thread ranks").c_str()));
        if (!with_ep) {  // the all-reduce overlapped with the backward, one tensor a bucket: MPI from a second thread
            const GradientSync sync{0, true};
            const Trained over = train_rank(comm, c, B, T, steps, false, sync);
            Trained over_threads;
            run_ranks(R, [&](Communicator& t) {
                Trained x = train_rank(t, c, B, T, steps, false, sync);
                if (t.rank() == comm.rank()) over_threads = x;
            });
            check(over.params == over_threads.params && over.losses == over_threads.losses,
                  str(R, (name + "overlapped buckets: bitwise = thread ranks").c_str()));
            if (R == 2)
                check(over.params == mine.params && over.losses == mine.losses,
                      str(R, (name + "overlapped buckets: bitwise = one all-reduce after the backward").c_str()));
        }
        if (comm.rank() != 0) continue;  // one comparison with the single rank is enough
        assemble(c, with_ep, mpi);
        check(mpi[0].replicas_identical, str(R, (name + "replicas bitwise identical").c_str()));
        const Trained single = train_single(c, B, T, steps);
        const double d = max_abs_diff(mpi[0].params, single.params);
        check(d <= 1e-3 * kLr * steps, str(R, (name + "params within 1e-3 lr·steps of one rank (max diff " +
                                               std::to_string(d / (kLr * steps)) + " lr·steps)").c_str()));
        bool close = true;
        for (int s = 0; s < steps; ++s) {
            const double a = mpi[0].losses[size_t(s)], b = single.losses[size_t(s)];
            close &= std::fabs(a - b) <= 1e-5 * std::fabs(b);
        }
        check(close, str(R, (name + "losses within 1e-5 of one rank").c_str()));
    }
    comm.barrier();
}

// --- EP alone, one forward/backward: bitwise the single-rank layers (as test_parallel.cpp on thread ranks) ----------
void test_ep_bitwise(Communicator& comm) {
    const int R = comm.world_size(), r = comm.rank(), T = 6, B = 2 * R;
    for (bool fp8 : {false, true}) {
        Config c = parallel_config(R, R / 2);
        c.fp8_training = fp8;
        const std::string name = std::string("EP forward/backward") + (fp8 ? " (FP8)" : "") + ": ";
        const std::vector<int32_t> tokens = random_rows(B, T, c.vocab_size, 5);
        const EpRankResult got = ep_forward_backward(comm, c, tokens, B, T);
        Model full(c, 11);
        set_bias(full);
        full.forward_backward(tokens.data(), B, T, loss_options());
        const EpCheck k = ep_check(c, tokens, B, T, R, r, got, full);
        check(k.loss && k.logits, str(R, (name + "loss and logits bitwise = one rank on the same rows").c_str()));
        check(k.outside_experts, str(R, (name + "gradients outside the routed experts bitwise").c_str()));
        check(k.own_experts && k.others_zero, str(R, (name + "own experts' gradients bitwise, others zero").c_str()));
        check(got.stats.max_ranks_per_token <= c.n_limited_groups && got.stats.dispatched_rows > 0,
              str(R, (name + "a token reaches at most n_limited_groups ranks").c_str()));
        EpRankResult thread;
        run_ranks(R, [&](Communicator& t) {
            EpRankResult x = ep_forward_backward(t, c, tokens, B, T);
            if (t.rank() == r) thread = x;
        });
        check(bitwise_equal(got.logits.data(), thread.logits.data(), got.logits.size()) &&
                  bitwise_equal(got.grads.data(), thread.grads.data(), got.grads.size()),
              str(R, (name + "logits and gradients bitwise = thread ranks").c_str()));
    }
    comm.barrier();
}

// --- a rank that fails -----------------------------------------------------------------------------------------------
void fail_mode(Communicator& comm, const std::string& mode) {
    const int R = comm.world_size(), r = comm.rank();
    if (mode == "fail-throw") {
        if (r == R - 1) {
            std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the others are waiting in all_reduce
            fail("rank ", r, " fails on purpose");
        }
        std::vector<float> x(1000, 1.0f);
        all_reduce(comm, x.data(), x.size());
    } else {  // rank 1 sends 8 (fail-size) or 32 (fail-long) bytes where its successor expects 16
        float x[8] = {}, y[8] = {};
        const size_t bytes = r != 1 ? 16 : mode == "fail-size" ? 8 : 32;
        comm.sendrecv(x, bytes, (r + 1) % R, y, 16, (r + R - 1) % R);
    }
    comm.barrier();
    std::this_thread::sleep_for(std::chrono::seconds(60));  // not reached when the failure ends the job
}

// --- timing: MPI processes against thread ranks ----------------------------------------------------------------------
// Seconds per call of op(comm), the ranks starting together: the best of 5 runs of ~0.06 s each (the machine may be
// shared: the best run is the one least disturbed), each the mean over its calls.
template <class Op>
double seconds_per_call(Communicator& comm, const Op& op) {
    op(comm);  // warm-up (buffers, connections)
    int reps = 1;
    double best = 1e30;
    for (int run = 0; run < 5;) {
        comm.barrier();
        const double t0 = now_seconds();
        for (int i = 0; i < reps; ++i) op(comm);
        comm.barrier();
        double t = now_seconds() - t0;
        all_reduce(comm, &t, 1, ReduceOp::mean);  // the same decision on every rank
        if (t < 0.03 && reps < (1 << 16)) {      // too short to time: more calls per run
            reps = t > 0.003 ? int(reps * 0.06 / t) + 1 : reps * 8;
            continue;
        }
        best = std::min(best, t / reps);
        ++run;
    }
    return best;
}

// MPI ranks idle while rank 0 times the thread ranks: the others wait sleeping, not spinning in MPI.
void quiet_barrier() {
    MPI_Request req;
    MPI_Ibarrier(MPI_COMM_WORLD, &req);
    for (int done = 0; !done; MPI_Test(&req, &done, MPI_STATUS_IGNORE))
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

void bench(Communicator& comm) {
    const int R = comm.world_size(), r = comm.rank();
    const std::vector<size_t> sizes = {size_t(1) << 10, size_t(1) << 14, size_t(1) << 18, size_t(1) << 22};  // floats
    const int64_t d = 256;  // all-to-all rows of d floats, the same count to every rank
    auto all_reduce_op = [](size_t n) {
        return [n](Communicator& c) {
            thread_local std::vector<float> x;  // each rank's own buffer (a thread rank's too), filled once
            if (x.size() != n) x.assign(n, 1.0f);
            all_reduce(c, x.data(), n);
        };
    };
    auto all_to_all_op = [d](size_t n) {
        return [n, d](Communicator& c) {
            const int64_t per = int64_t(n) / d / c.world_size();
            thread_local std::vector<float> s, t;
            if (s.size() != size_t(per * d * c.world_size())) s.assign(size_t(per * d * c.world_size()), 1.0f);
            t.resize(s.size());
            const std::vector<int64_t> counts(size_t(c.world_size()), per);
            all_to_all(c, s.data(), counts, d, t.data(), counts);
        };
    };
    std::vector<double> mpi_ar, mpi_a2a, thr_ar, thr_a2a;
    for (size_t n : sizes) mpi_ar.push_back(seconds_per_call(comm, all_reduce_op(n)));
    for (size_t n : sizes) mpi_a2a.push_back(seconds_per_call(comm, all_to_all_op(n)));
    if (r == 0)
        run_ranks(R, [&](Communicator& t) {
            for (size_t n : sizes) {
                const double s = seconds_per_call(t, all_reduce_op(n));
                if (t.rank() == 0) thr_ar.push_back(s);
            }
            for (size_t n : sizes) {
                const double s = seconds_per_call(t, all_to_all_op(n));
                if (t.rank() == 0) thr_a2a.push_back(s);
            }
        });
    quiet_barrier();
    if (r != 0) return;
    // Bus bandwidth as NCCL counts it: all-reduce 2(R−1)/R·bytes per rank, all-to-all (R−1)/R·bytes (off-rank rows).
    std::printf("R = %d ranks, %d OpenMP threads per MPI rank\n", R, thread_count());
    std::printf("| operation | bytes per rank | MPI processes: time, bus GB/s | thread ranks: time, bus GB/s |\n");
    std::printf("|---|---|---|---|\n");
    for (int op = 0; op < 2; ++op)
        for (size_t i = 0; i < sizes.size(); ++i) {
            const double bytes = double(sizes[i]) * 4, bus = bytes * (op == 0 ? 2.0 : 1.0) * (R - 1) / R;
            const double tm = (op == 0 ? mpi_ar : mpi_a2a)[i], tt = (op == 0 ? thr_ar : thr_a2a)[i];
            std::printf("| %s | %.0f KiB | %.1f µs, %.2f | %.1f µs, %.2f |\n", op == 0 ? "all-reduce" : "all-to-all",
                        bytes / 1024, tm * 1e6, bus / tm / 1e9, tt * 1e6, bus / tt / 1e9);
        }
    // The cost model t = α + β·(bus bytes): β, the per-byte cost, is the slope between the two largest sizes; α, the
    // fixed cost of one call, is what β leaves of the smallest size's time.
    auto fit = [&](const std::vector<double>& t, double factor, const char* name) {
        auto x = [&](size_t i) { return double(sizes[i]) * 4 * factor * (R - 1) / R; };
        const size_t k = sizes.size() - 1;
        const double beta = (t[k] - t[k - 1]) / (x(k) - x(k - 1)), alpha = t[0] - beta * x(0);
        std::printf("%-26s alpha %.1f µs per call, beta %.3f ns per bus byte (%.2f GB/s)\n", name, alpha * 1e6,
                    beta * 1e9, 1 / beta / 1e9);
    };
    fit(mpi_ar, 2, "all-reduce, MPI:");
    fit(thr_ar, 2, "all-reduce, thread ranks:");
    fit(mpi_a2a, 1, "all-to-all, MPI:");
    fit(thr_a2a, 1, "all-to-all, thread ranks:");
}

}  // namespace

int main(int argc, char** argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    run_mpi(argc, argv, [&](Communicator& comm) {
        g_rank = comm.rank();
        const int R = comm.world_size();
        if (mode.rfind("fail-", 0) == 0) return fail_mode(comm, mode);
        if (mode == "bench") return bench(comm);
        if (!mode.empty()) fail("test_mpi: unknown mode \"", mode, "\" (fail-throw, fail-size, fail-long, bench)");
        if (R != 2 && R != 4) fail("test_mpi: run it on 2 or 4 processes (mpirun -np 2 or -np 4), not ", R);
        const double start = now_seconds();
        test_collectives(comm);
        test_training(comm, false);
        test_ep_bitwise(comm);
        test_training(comm, true);
        int64_t counts[2] = {g_checks, g_failures};
        all_reduce(comm, counts, 2);
        if (comm.rank() == 0)
            std::printf("test_mpi: %d MPI ranks, %lld checks, %lld failed, %.1f s\n", R, (long long)counts[0],
                        (long long)counts[1], now_seconds() - start);
        g_failures = int(counts[1]);
    });
    return g_failures ? 1 : 0;
}
