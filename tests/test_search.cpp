// build/search's accounting (examples/search.hpp): the sampled configurations stay inside the FLOPs budget and the
// search space's invariants, the time plan never spends more than the budget, and the Pareto front is the set of
// non-dominated points.
#include <doctest/doctest.h>

#include "../examples/search.hpp"

#include <cmath>
#include <set>

using namespace dsv3;

TEST_CASE("search: sampled configurations are distinct, valid, inside the FLOPs budget, with the space's invariants") {
    const int T = 64;
    const double f0 = search::flops_per_token(Config::tiny(), T);
    for (uint64_t seed : {1, 2, 3}) {
        const std::vector<search::Choice> choices = search::sample(12, T, seed);
        REQUIRE(choices.size() == 12);
        std::set<std::string> names;
        for (const search::Choice& ch : choices) {
            CAPTURE(ch.name());
            names.insert(ch.name());
            const Config c = search::config_of(ch);
            CHECK_NOTHROW(c.validate());
            CHECK(std::abs(search::flops_per_token(c, T) - f0) <= search::kFlopsTolerance * f0);
            CHECK(c.n_routed_experts * c.moe_inter_dim == search::kRoutedChannels);   // segmentation keeps the total
            CHECK((c.n_activated_experts + c.n_shared_experts) * c.moe_inter_dim == search::kActivatedWidth);
            CHECK(c.n_activated_experts <= c.n_limited_groups * (c.n_routed_experts / c.n_expert_groups));
        }
        CHECK(names.size() == choices.size());
        CHECK(search::sample(12, T, seed)[5].name() == choices[5].name());   // the same list every run
    }
    // the GShard baseline: top-2 of 16 equal experts, no shared one, at the same activated width and FLOPs budget
    const Config g = search::gshard_config();
    CHECK(g.n_activated_experts * g.moe_inter_dim == search::kActivatedWidth);
    CHECK(search::admissible(g, T));
    // beside a candidate: only the MoE layer differs
    const Config fine = search::config_of(search::sample(1, T, 4)[0]);
    Config g2 = search::gshard_config(fine);
    CHECK(g2.n_routed_experts == 16);
    CHECK(g2.n_shared_experts == 0);
    g2.moe_inter_dim = fine.moe_inter_dim;
    g2.n_routed_experts = fine.n_routed_experts;
    g2.n_shared_experts = fine.n_shared_experts;
    g2.n_activated_experts = fine.n_activated_experts;
    g2.n_expert_groups = fine.n_expert_groups;
    g2.n_limited_groups = fine.n_limited_groups;
    CHECK(g2.to_text() == fine.to_text());
    // outside the budget: twice the activated width
    Config big = Config::tiny();
    big.moe_inter_dim *= 4;
    CHECK_FALSE(search::admissible(big, T));
}

TEST_CASE("search: the time plan halves the candidates down to one and never spends more than the budget") {
    for (double budget : {60.0, 600.0, 1800.0, 7777.0})
        for (int n : {2, 3, 8, 12, 13, 100}) {
            CAPTURE(budget);
            CAPTURE(n);
            const search::Plan p = search::plan(budget, n);
            REQUIRE(!p.rounds.empty());
            CHECK(p.rounds.front().candidates == n);
            CHECK(p.rounds.back().candidates == 1);
            for (size_t r = 1; r < p.rounds.size(); ++r)
                CHECK(p.rounds[r].candidates == (p.rounds[r - 1].candidates + 1) / 2);
            double search_seconds = 0;
            for (const search::Round& r : p.rounds) {
                CHECK(r.seconds_each > 0);
                search_seconds += r.candidates * r.seconds_each;
            }
            CHECK(search_seconds == doctest::Approx(0.7 * budget));
            CHECK(p.final_seconds == doctest::Approx(0.3 * budget));
            CHECK(p.total() <= budget * (1 + 1e-12));
        }
}

TEST_CASE("search: the Pareto front keeps exactly the points no other beats in both speed and loss") {
    //                          0     1     2     3     4     5
    const std::vector<double> speed = {100, 200, 150, 300, 200, 50};
    const std::vector<double> loss = {2.0, 2.5, 1.9, 3.0, 2.6, 1.8};
    // 1 beats 4 (same speed, lower loss); 2 beats 0 (faster and lower); 3 fastest, 5 lowest loss
    CHECK(search::pareto_front(speed, loss) == std::vector<size_t>{5, 2, 1, 3});
    CHECK(search::pareto_front({1}, {1}) == std::vector<size_t>{0});
    CHECK(search::pareto_front({}, {}).empty());
}
