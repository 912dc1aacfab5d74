"""auto's policy table, without MPI: every rule reachable, the first match wins, overrides apply,
and the table makes the same choices as the rules it replaced (written out here as a reference)."""

import itertools

import pytest

from mpisgd.comm import policy
from mpisgd.comm.fusion import cut_into_buckets
from mpisgd.comm.policy import (
    RULES,
    Band,
    MpiLibrary,
    Nodes,
    Request,
    Rule,
    Situation,
    Threshold,
    choose,
    decide,
    is_power_of_two,
)

SIZES = (1, 2, 3, 4, 5, 6, 8)
MESSAGES = (0, 4 << 10, 300 << 10, 600 << 10, 1 << 20, 3 << 20, 5 << 20, 64 << 20)
OVERRIDES = ({}, {"native_below_bytes": 0}, {"native_below_bytes": 8 << 20}, {"shm_below_bytes": 0},
             {"shm_below_bytes": 1 << 30}, {"native_below_bytes": 0, "shm_below_bytes": 1 << 30})


def situations(library=MpiLibrary.MPICH):
    for size, nodes, ranks_per_node, window, hierarchical, overrides, odd in itertools.product(
            SIZES, Nodes, (1, 2, None), (True, False), (True, False), OVERRIDES, ("ring", "rhd")):
        if nodes is Nodes.ONE:  # every rank on the one node
            if ranks_per_node is not None:
                continue
            ranks_per_node = size
        elif ranks_per_node is None or ranks_per_node >= size:
            continue
        yield Situation(size, nodes, ranks_per_node, library, window=window, hierarchical=hierarchical,
                        non_power_of_two=odd, overrides=overrides)


def requests():
    for nbytes, host, fused in itertools.product(MESSAGES, (True, False), (True, False)):
        yield Request(nbytes, host, fused)


def reference_choice(s: Situation, r: Request) -> str:
    """The rules as the communicator wrote them before the table (its properties and fallbacks)."""
    configured_native, configured_shm = s.overrides.get("native_below_bytes"), s.overrides.get("shm_below_bytes")
    shm_for_fusion = s.size > 1 and s.nodes is Nodes.ONE and s.window
    hierarchical = s.nodes is Nodes.EQUAL and s.ranks_per_node > 1 and s.hierarchical and s.window
    if not shm_for_fusion:
        shm_below = 0
    elif configured_shm is not None:
        shm_below = configured_shm
    else:
        shm_below = 4 << 20 if s.size > 2 and not is_power_of_two(s.size) else 0
    if configured_native is not None:
        native_below = configured_native
    elif shm_below > 0 or (s.nodes is not Nodes.ONE and s.ranks_per_node > 1):
        native_below = 512 << 10
    else:
        native_below = 2 << 20 if s.size <= 2 else 4 << 20
    if r.fused and r.host and s.size > 1 and (hierarchical or (shm_for_fusion and r.nbytes >= 256 << 10)):
        return "hier" if hierarchical else "shm"
    if s.size == 1 or r.nbytes < native_below:
        return "native"
    if r.host and r.nbytes < shm_below:
        return "shm"
    if r.host and hierarchical:
        return "hier"
    return "rhd" if is_power_of_two(s.size) else s.non_power_of_two


def test_the_table_makes_the_choices_of_the_rules_it_replaced():
    for s in situations():
        for r in requests():
            assert choose(s, r) == reference_choice(s, r), (s, r)


def test_every_rule_is_reached():
    reached = {decide(s, r)[0].name for library in MpiLibrary for s in situations(library) for r in requests()}
    assert reached == {rule.name for rule in RULES}


def test_every_band_of_every_rule_is_reached():
    reached = set()
    for s in itertools.chain.from_iterable(map(situations, MpiLibrary)):
        for r in requests():
            rule, algorithm = decide(s, r)
            reached.add((rule.name, policy.LARGE if algorithm in ("rhd", "ring") else algorithm))
    for rule in RULES:
        for band in rule.bands:
            if band.algorithm is not None:
                assert (rule.name, band.algorithm) in reached or (
                    band.algorithm == policy.LARGE and (rule.name, "hier") in reached), (rule.name, band)


def test_the_first_rule_that_applies_wins_and_a_band_without_algorithm_passes_on():
    always = lambda s, r: True  # noqa: E731
    cut = Threshold("cut", 100)
    rules = (Rule("never", lambda s, r: False, (Band(None, "native"),)),
             Rule("small passes on", always, (Band(cut, None), Band(None, "shm"))),
             Rule("first catch-all", always, (Band(None, "ring"),)),
             Rule("second catch-all", always, (Band(None, "rhd"),)))
    s = Situation(4)
    assert decide(s, Request(1000), rules)[0].name == "small passes on"
    assert decide(s, Request(10), rules) == (rules[2], "ring")
    assert decide(Situation(4, overrides={"cut": 10_000}), Request(1000), rules)[0].name == "first catch-all"


def test_rules_apply_to_their_libraries_only():
    mpich_only = Rule("mpich only", lambda s, r: True, (Band(None, "shm"),), frozenset({MpiLibrary.MPICH}))
    rules = (mpich_only, Rule("rest", lambda s, r: True, (Band(None, "native"),)))
    assert decide(Situation(4, library=MpiLibrary.MPICH), Request(1), rules)[1] == "shm"
    assert decide(Situation(4, library=MpiLibrary.OPEN_MPI), Request(1), rules)[1] == "native"
    # Open MPI (measured, BENCHMARKS.md): its own below 1 MiB at p=2 and below 32 MiB at p=3 on one node;
    # across nodes and at p=4 it runs the MPICH-measured rules
    open_mpi = MpiLibrary.OPEN_MPI
    assert choose(Situation(2, library=open_mpi), Request(512 << 10)) == "native"
    assert choose(Situation(2, library=open_mpi), Request(1 << 20)) == "rhd"
    assert choose(Situation(3, library=open_mpi), Request(16 << 20)) == "native"
    assert choose(Situation(3, library=open_mpi), Request(64 << 20)) == "ring"
    assert choose(Situation(3, library=open_mpi, overrides={"shm_below_bytes": 8 << 20}), Request(1 << 20)) == "shm"
    assert choose(Situation(2, library=open_mpi, overrides={"shm_below_bytes": 1 << 30}), Request(1 << 20)) == "shm"
    for s in situations():
        if s.nodes is Nodes.ONE and (s.size <= 2 or not s.power_of_two):
            continue
        for r in requests():
            other = Situation(**{**s.__dict__, "library": open_mpi})
            assert choose(other, r) == choose(s, r)


def test_overrides_replace_the_named_thresholds():
    three = Situation(3)
    assert choose(three, Request(300 << 10)) == "native" and choose(three, Request(1 << 20)) == "shm"
    assert choose(Situation(3, overrides={"native_below_bytes": 0}), Request(300 << 10)) == "shm"
    assert choose(Situation(3, overrides={"shm_below_bytes": 0}), Request(1 << 20)) == "native"
    assert choose(Situation(3, overrides={"shm_below_bytes": 0}), Request(5 << 20)) == "ring"
    assert choose(Situation(3, non_power_of_two="rhd"), Request(64 << 20)) == "rhd"
    two = Situation(2, overrides={"shm_below_bytes": 1 << 30})
    assert choose(Situation(2), Request(1 << 20)) == "native" and choose(two, Request(1 << 20)) == "shm"
    assert policy.native_below_bytes(Situation(5, overrides={"native_below_bytes": 123})) == 123


def test_thresholds_read_off_the_table():
    assert policy.native_below_bytes(Situation(1)) == policy.NATIVE_UP_TO_TWO_RANKS.default_bytes
    assert policy.native_below_bytes(Situation(4)) == policy.NATIVE_MORE_RANKS.default_bytes
    assert policy.native_below_bytes(Situation(3)) == policy.NATIVE_BESIDE_SHM.default_bytes
    assert policy.shm_below_bytes(Situation(3)) == policy.SHM_SINGLE_BELOW.default_bytes
    assert policy.shm_below_bytes(Situation(4)) == 0 and policy.shm_below_bytes(Situation(3, window=False)) == 0
    across = Situation(4, Nodes.EQUAL, 2, hierarchical=True)
    assert policy.native_below_bytes(across) == policy.NATIVE_ACROSS_NODES.default_bytes
    assert policy.window_takes_fused_buckets(across) and policy.window_takes_fused_buckets(Situation(2))
    assert not policy.window_takes_fused_buckets(Situation(4, Nodes.EQUAL, 2))
    assert not policy.window_takes_fused_buckets(Situation(1))


def test_segments_on_one_node_only_unless_configured():
    assert policy.segment_bytes(Situation(4), None) == 256 << 10
    assert policy.segment_bytes(Situation(4, Nodes.EQUAL, 2), None) == 0
    assert policy.segment_bytes(Situation(4, Nodes.EQUAL, 2), 4096) == 4096


@pytest.mark.parametrize("text, library", [
    ("MPICH Version:      4.3.0\nMPICH Release date: ...", MpiLibrary.MPICH),
    ("Open MPI v5.0.11, package: Open MPI ...", MpiLibrary.OPEN_MPI),
    ("Intel(R) MPI Library 2021.10", MpiLibrary.MPICH),
    ("Some Vendor MPI 1.0", MpiLibrary.OTHER),
])
def test_library_detection(text, library):
    assert policy.detect_library(text) is library


def test_buckets_are_cut_in_order_and_oversized_items_go_alone():
    assert cut_into_buckets([3, 3, 3, 10, 1], lambda n: n, 6) == [[3, 3], [3], [10], [1]]
    assert cut_into_buckets([], lambda n: n, 6) == []
    assert cut_into_buckets([7], lambda n: n, 6) == [[7]]
