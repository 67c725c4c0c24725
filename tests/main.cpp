// The test suite's entry point: doctest's main. Each tests/test_*.cpp holds the tests of one part of the header.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
