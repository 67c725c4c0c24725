// The test suite's entry point: doctest's main, after the header's choice of OpenMP threads that sleep while they
// wait (a suite run beside other work, a build for instance, keeps its speed). Each tests/test_*.cpp holds the tests
// of one part of the header.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "../deepseek_v3.hpp"

int main(int argc, char** argv) {
    dsv3::prefer_sleeping_threads(argv);
    return doctest::Context(argc, argv).run();
}
