// build/params --preset v3_671b: parameter counts, activated parameters, training FLOPs and KV-cache bytes per token,
// next to the published figures (V3 report §1 and Table 1; Insights into DeepSeek-V3, arXiv 2505.09343, Table 2).
#include <cstdio>
#include <cstring>
#include <string>

#include "../deepseek_v3.hpp"

static dsv3::Config preset(const std::string& name) {
    if (name == "tiny") return dsv3::Config::tiny();
    if (name == "small") return dsv3::Config::small();
    if (name == "large") return dsv3::Config::large();
    if (name == "v2_lite" || name == "16b") return dsv3::Config::v2_lite();
    if (name == "v3_671b" || name == "671b") return dsv3::Config::v3_671b();
    dsv3::fail("--preset: expected tiny, small, large, v2_lite or v3_671b, found \"", name, "\"");
}

static void usage() {
    std::printf(
        "usage: params [options]\n"
        "Prints a preset's parameter counts, training FLOPs and KV-cache bytes per token, with the published ones.\n"
        "  --preset NAME         tiny, small, large, v2_lite (16b) or v3_671b (671b) (default v3_671b)\n"
        "  --seq T               the sequence length of the FLOP count (default 4096)\n"
        "  --help, -h            this text\n");
}

int main(int argc, char** argv) {
    try {
        std::string name = "v3_671b";
        int seq_len = 4096;
        for (int i = 1; i < argc; ++i) {
            std::string a = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) dsv3::fail(a, ": expected a value");
                return argv[++i];
            };
            if (a == "--preset") name = value();
            else if (a == "--seq") seq_len = int(dsv3::parse_int(value(), a, 1, 1 << 22));
            else if (a == "--help" || a == "-h") { usage(); return 0; }
            else dsv3::fail("unknown option \"", a, "\" (see params --help)");
        }
        const dsv3::Config c = preset(name);
        const dsv3::ParamCounts n = dsv3::count_parameters(c);
        auto billions = [](int64_t x) { return double(x) / 1e9; };  // (tiny and small print in millions)
        const bool large = n.total > 1000000000LL;
        std::printf("preset %s\n\n", name.c_str());
        if (!large) {
            std::printf("parameters, main model          %12.2fM\nparameters, MTP modules         %12.2fM\n"
                        "activated per token             %12.2fM\n", n.total / 1e6, n.mtp / 1e6, n.activated / 1e6);
            std::printf("training FLOPs per token, T=%-5d %10.2f MFLOPs\nKV cache per token (BF16): MLA %lld B, "
                        "MHA of the same shape %lld B\n", seq_len, dsv3::training_flops_per_token(c, seq_len) / 1e6,
                        (long long)dsv3::kv_cache_bytes_mla(c), (long long)dsv3::kv_cache_bytes_mha(c));
            return 0;
        }
        std::printf("parameters, main model          %18lld  (%.1fB)\n", (long long)n.total, billions(n.total));
        std::printf("parameters, MTP modules         %18lld  (%.1fB; %lld = %.1fB as stored, with their copies of\n"
                    "                                                    embedding and head)\n",
                    (long long)n.mtp, billions(n.mtp), (long long)n.mtp_in_checkpoint, billions(n.mtp_in_checkpoint));
        std::printf("parameters in the checkpoint    %18lld  (%.1fB)\n", (long long)(n.total + n.mtp_in_checkpoint),
                    billions(n.total + n.mtp_in_checkpoint));
        std::printf("activated per token             %18lld  (%.1fB)\n", (long long)n.activated, billions(n.activated));
        const double flops = dsv3::training_flops_per_token(c, seq_len);
        std::printf("training FLOPs per token, T=%-5d %17.1f GFLOPs (6 x (activated - embedding) + attention)\n",
                    seq_len, flops / 1e9);
        std::printf("\nKV cache per token (BF16):\n");
        std::printf("  MLA (c_KV + k_rope)           %12lld B  (%.3f KB)\n", (long long)dsv3::kv_cache_bytes_mla(c),
                    dsv3::kv_cache_bytes_mla(c) / 1000.0);
        std::printf("  MHA of the same shape         %12lld B  (%.3f KB)\n", (long long)dsv3::kv_cache_bytes_mha(c),
                    dsv3::kv_cache_bytes_mha(c) / 1000.0);
        std::printf("  Qwen-2.5 72B (GQA, 80 x 8 x 128)   %7lld B  (%.3f KB)\n",
                    (long long)dsv3::kv_cache_bytes_gqa(80, 8, 128), dsv3::kv_cache_bytes_gqa(80, 8, 128) / 1000.0);
        std::printf("  LLaMA-3.1 405B (GQA, 126 x 8 x 128) %6lld B  (%.3f KB)\n",
                    (long long)dsv3::kv_cache_bytes_gqa(126, 8, 128), dsv3::kv_cache_bytes_gqa(126, 8, 128) / 1000.0);
        if (name == "v3_671b" || name == "671b")
            std::printf("\npublished: 671B total, 37B activated, 685B in the checkpoint (671B + 14B MTP), 70.272 KB KV "
                        "cache,\n           about 250 GFLOPs of training per token at T=4096 (Insights paper, Table 2)\n");
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "params: error: %s\n", e.what());
        return 1;
    } catch (...) {  // not a std::exception: still a message and a non-zero exit, not std::terminate
        std::fprintf(stderr, "params: error: unknown exception\n");
        return 1;
    }
}
