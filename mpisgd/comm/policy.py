"""What ``algorithm="auto"`` runs: one ordered table of rules, the first that applies wins.

As in Horovod's operation manager, each :class:`Rule` answers "does this request, on this
communicator, fall to me?" for one situation (process count, power of two or not, nodes, host or
device memory, a single vector or a fused bucket, MPI library) and then reads the message size off
its :class:`Band` ladder: the first band the size is below names the algorithm (``LARGE``: rhd for a
power-of-two process count, else ``non_power_of_two``); a band naming no algorithm passes the request
on to the next rule. The thresholds are named :class:`Threshold` data in the table, and
:class:`~mpisgd.comm.config.AllreduceConfig` overrides them by name.

The rules were measured with MPICH (BENCHMARKS.md); two rules measured with Open MPI 5 on one node
(BENCHMARKS.md, "Open MPI") come first for it, and otherwise it runs the MPICH rules.
Every rank asks with the same facts and gets the same answer, so they all enter the same collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, NamedTuple, Optional

NATIVE, RHD, RING, SHM, HIER = "native", "rhd", "ring", "shm", "hier"
#: rhd for a power-of-two process count, else the configured ``non_power_of_two`` (ring by default)
LARGE = "large"
WINDOW_ALGORITHMS = (SHM, HIER)
#: a size no message reaches: asks which rule takes arbitrarily large messages
UNBOUNDED = 1 << 62


class Nodes(Enum):
    """How the communicator's ranks lie on nodes."""

    ONE = "one node"
    EQUAL = "several nodes with equal numbers of ranks"
    UNEQUAL = "several nodes with unequal numbers of ranks"


class MpiLibrary(Enum):
    MPICH = "MPICH"
    OPEN_MPI = "Open MPI"
    OTHER = "other"


def detect_library(version_text: str) -> MpiLibrary:
    """The MPI library from ``MPI.Get_library_version()``'s text (MPICH derivatives count as MPICH)."""
    if "Open MPI" in version_text:
        return MpiLibrary.OPEN_MPI
    if any(name in version_text for name in ("MPICH", "MVAPICH", "Intel(R) MPI", "CRAY MPICH")):
        return MpiLibrary.MPICH
    return MpiLibrary.OTHER


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Threshold(NamedTuple):
    """A size limit of the table: ``name`` is the AllreduceConfig field that overrides it."""

    name: str
    default_bytes: int


NATIVE_BESIDE_SHM = Threshold("native_below_bytes", 512 << 10)
NATIVE_ACROSS_NODES = Threshold("native_below_bytes", 512 << 10)  # MPICH's own: 0.3x of rhd/ring from 1 MiB
NATIVE_UP_TO_TWO_RANKS = Threshold("native_below_bytes", 2 << 20)
NATIVE_MORE_RANKS = Threshold("native_below_bytes", 4 << 20)
SHM_SINGLE_BELOW = Threshold("shm_below_bytes", 4 << 20)
#: below it, MPI's own Allreduce of a fused bucket is as fast: the window's two barriers cost as much
SHM_FUSION_FROM = Threshold("shm_fusion_min_bytes", 256 << 10)
#: Open MPI 5, p=2: rhd 0.73x its own at 1 MiB, native 0.75x rhd at 256 KiB
OPEN_MPI_NATIVE_UP_TO_TWO_RANKS = Threshold("native_below_bytes", 1 << 20)
#: Open MPI 5, p=3: its own beats shm, rhd and ring up to 16 MiB (ring 1.08x), ring 0.49x at 64 MiB
OPEN_MPI_NATIVE_NOT_POWER_OF_TWO = Threshold("native_below_bytes", 32 << 20)
OPEN_MPI = frozenset({MpiLibrary.OPEN_MPI})


@dataclass(frozen=True)
class Situation:
    """What ``auto`` knows about the communicator, the same on every rank.

    ``window``: the shared window may be used (``shared_memory`` on, and /dev/shm held it);
    ``overrides``: the configured thresholds by name (absent or None: the table's defaults).
    """

    size: int
    nodes: Nodes = Nodes.ONE
    ranks_per_node: int = 1  # on the fullest node
    library: MpiLibrary = MpiLibrary.MPICH
    window: bool = True
    hierarchical: bool = False
    non_power_of_two: str = RING
    overrides: dict = field(default_factory=dict)

    @property
    def power_of_two(self) -> bool:
        return is_power_of_two(self.size)

    @property
    def window_on_one_node(self) -> bool:
        return self.size > 1 and self.nodes is Nodes.ONE and self.window

    @property
    def hier_usable(self) -> bool:
        """Several equal nodes of several ranks each, and the window and ``hierarchical`` on."""
        return self.nodes is Nodes.EQUAL and self.ranks_per_node > 1 and self.window and self.hierarchical

    def bytes_of(self, threshold: Threshold) -> int:
        configured = self.overrides.get(threshold.name)
        return threshold.default_bytes if configured is None else configured

    @property
    def shm_single_configured(self) -> bool:
        """``shm_below_bytes`` was set: the rules measured without it (Open MPI's) step aside."""
        return self.overrides.get(SHM_SINGLE_BELOW.name) is not None

    def shm_for_single_vectors(self) -> bool:
        """Single host vectors go through the window on one node: where configured (> 0), else by default
        only for process counts above two that are not powers of two."""
        if not self.window_on_one_node:
            return False
        configured = self.overrides.get(SHM_SINGLE_BELOW.name)
        return configured > 0 if configured is not None else self.size > 2 and not self.power_of_two


@dataclass(frozen=True)
class Request:
    """One all-reduce: ``fused`` is a fused bucket small enough to pack straight into the window."""

    nbytes: int
    host: bool = True
    fused: bool = False


class Band(NamedTuple):
    """Sizes below ``below`` (None: every size) run ``algorithm`` (None: ask the next rule)."""

    below: Optional[Threshold]
    algorithm: Optional[str]


@dataclass(frozen=True)
class Rule:
    name: str
    applies: Callable[[Situation, Request], bool]
    bands: tuple
    libraries: frozenset = frozenset(MpiLibrary)  # measured with MPICH; the others run the same until measured


def _ladder(*bands: Band) -> tuple:
    return bands


RULES: Sequence[Rule] = (
    Rule("one rank", lambda s, r: s.size == 1, _ladder(Band(None, NATIVE))),
    Rule("fused host bucket across equal nodes (hierarchical)",
         lambda s, r: r.fused and r.host and s.hier_usable, _ladder(Band(None, HIER))),
    Rule("fused host bucket on one node",
         lambda s, r: r.fused and r.host and s.window_on_one_node,
         _ladder(Band(SHM_FUSION_FROM, None), Band(None, SHM))),
    Rule("Open MPI: up to two ranks on one node, shm for single vectors not configured",
         lambda s, r: s.size <= 2 and s.nodes is Nodes.ONE and not s.shm_single_configured,
         _ladder(Band(OPEN_MPI_NATIVE_UP_TO_TWO_RANKS, NATIVE), Band(None, LARGE)), OPEN_MPI),
    Rule("Open MPI: not a power of two on one node, shm for single vectors not configured",
         lambda s, r: s.nodes is Nodes.ONE and not s.power_of_two and not s.shm_single_configured,
         _ladder(Band(OPEN_MPI_NATIVE_NOT_POWER_OF_TWO, NATIVE), Band(None, LARGE)), OPEN_MPI),
    Rule("host vector on one node, where shm serves single vectors",
         lambda s, r: r.host and s.shm_for_single_vectors(),
         _ladder(Band(NATIVE_BESIDE_SHM, NATIVE), Band(SHM_SINGLE_BELOW, SHM), Band(None, LARGE))),
    Rule("device vector on one node, where shm serves single host vectors",
         lambda s, r: not r.host and s.shm_for_single_vectors(),
         _ladder(Band(NATIVE_BESIDE_SHM, NATIVE), Band(None, LARGE))),
    Rule("host vector across equal nodes (hierarchical)",
         lambda s, r: r.host and s.hier_usable, _ladder(Band(NATIVE_ACROSS_NODES, NATIVE), Band(None, HIER))),
    Rule("across nodes, several ranks on a node",
         lambda s, r: s.nodes is not Nodes.ONE and s.ranks_per_node > 1,
         _ladder(Band(NATIVE_ACROSS_NODES, NATIVE), Band(None, LARGE))),
    Rule("up to two ranks", lambda s, r: s.size <= 2, _ladder(Band(NATIVE_UP_TO_TWO_RANKS, NATIVE), Band(None, LARGE))),
    Rule("more ranks", lambda s, r: True, _ladder(Band(NATIVE_MORE_RANKS, NATIVE), Band(None, LARGE))),
)


def large_message_algorithm(size: int, non_power_of_two: str = RING) -> str:
    """rhd for a power-of-two process count, else ``non_power_of_two``."""
    return RHD if is_power_of_two(size) else non_power_of_two


def decide(situation: Situation, request: Request, rules: Sequence[Rule] = RULES) -> tuple[Rule, str]:
    """The rule that takes ``request`` and the algorithm it names (``LARGE`` resolved)."""
    for rule in rules:
        if situation.library not in rule.libraries or not rule.applies(situation, request):
            continue
        for band in rule.bands:
            if band.below is None or request.nbytes < situation.bytes_of(band.below):
                if band.algorithm is None:
                    break  # this rule passes the request on
                if band.algorithm == LARGE:
                    return rule, large_message_algorithm(situation.size, situation.non_power_of_two)
                return rule, band.algorithm
    raise AssertionError("the last rule applies to every request")  # pragma: no cover


def choose(situation: Situation, request: Request) -> str:
    """What ``auto`` runs for ``request``."""
    return decide(situation, request)[1]


def _threshold_of(situation: Situation, request: Request, algorithm: str) -> int:
    """The limit below which the rule taking ``request`` runs ``algorithm`` (0: it never does)."""
    for rule in RULES:
        if situation.library in rule.libraries and rule.applies(situation, request):
            for band in rule.bands:
                if band.algorithm == algorithm and band.below is not None:
                    return situation.bytes_of(band.below)
            if any(band.below is not None for band in rule.bands):
                return 0  # the first rule with limits that applies sets them (one rank's has none)
    return 0


def native_below_bytes(situation: Situation) -> int:
    """Single host vectors below this go to MPI's own Allreduce (the first rule with a native limit)."""
    return _threshold_of(situation, Request(0), NATIVE)


def shm_below_bytes(situation: Situation) -> int:
    """Single host vectors from ``native_below_bytes`` up to this go through the window (0: none do)."""
    return _threshold_of(situation, Request(0), SHM)


def window_takes_fused_buckets(situation: Situation) -> bool:
    """Large fused host buckets go through the window (so buckets are cut to its area)."""
    return choose(situation, Request(UNBOUNDED, fused=True)) in WINDOW_ALGORITHMS


def segment_bytes(situation: Situation, configured: Optional[int]) -> int:
    """Piece size of rhd's and ring's reduce steps on host buffers: 256 KiB on one node, whole messages
    across nodes (where on MPICH's network path pieces cost ~10%), unless configured."""
    if configured is not None:
        return configured
    return 256 << 10 if situation.nodes is Nodes.ONE else 0
