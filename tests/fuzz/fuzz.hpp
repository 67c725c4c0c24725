// tests/fuzz: libFuzzer harnesses, one a parser of untrusted input (`make fuzz` builds them, `make fuzz-run` runs
// them; tests/fuzz/run.sh says how). Each harness hands the fuzzer's bytes to the header's reader the way a program
// does, through a file where the reader takes a path. Every input must end in a result or in a dsv3::Error: a crash, a
// sanitizer report (AddressSanitizer, UndefinedBehaviorSanitizer, LeakSanitizer), an allocation beyond libFuzzer's
// -rss_limit_mb, a time-out or an exception of another type (std::bad_alloc, std::out_of_range, ...) is a finding.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <unistd.h>

#include "../../deepseek_v3.hpp"

namespace fuzz {

// The input as a file: one path per process, rewritten for every input (libFuzzer's -jobs and -fork run inputs in
// separate processes, so the process id keeps them apart).
inline std::string as_file(const uint8_t* data, size_t size, const char* name) {
    static const std::string path = (std::filesystem::temp_directory_path() /
                                     ("dsv3_fuzz_" + std::to_string(getpid()) + "_" + name)).string();
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || (size && std::fwrite(data, 1, size, f) != size) || std::fclose(f) != 0) std::abort();
    return path;
}

// Runs one input: a dsv3::Error is the expected answer to a malformed file; any other exception escapes, and
// libFuzzer reports it (std::terminate).
template <class F>
int run(F&& f) {
    try {
        f();
    } catch (const dsv3::Error&) {
    }
    return 0;
}

// A property that must hold for every accepted input (a round trip); its failure is a finding.
inline void require(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "fuzz: property failed: %s\n", what);
        std::abort();
    }
}

}  // namespace fuzz
