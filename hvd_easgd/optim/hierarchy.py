"""Hierarchical EASGD over Horovod process sets, and EASGD among the members of one set.

On a cluster the links inside a node are an order of magnitude faster than those between nodes.
With ``hierarchy=`` the workers are split into *groups* of equal size n (by host, or given as
lists of ranks):

- inside a group, training is synchronous SGD: every step, one grouped allreduce averages the
  gradients over the group's process set, so the group's workers stay bit-identical;
- between the m groups, every ``tau`` steps, one EASGD round with ``alpha = beta / m``: each group
  acts as one EASGD worker. Its n workers hold the same ``d = x - c``, so instead of each sending
  all of it (n times the same bytes from one node) local rank j sends only slice j (1/n of the
  round) over a *cross* process set (the j-th worker of every group), and the group then
  allgathers the n summed slices. A node puts P bytes (one model) on the inter-node links per
  round instead of n * P.

With ``process_set=`` (``hvd_easgd.DistributedOptimizer(..., process_set=ps)``) EASGD runs among
the set's members only (groups of one worker each).

Process sets must be known to Horovod. Start it with ``hvd.init(process_sets="dynamic")`` (or
``HOROVOD_DYNAMIC_PROCESS_SETS=1``) and the optimizer registers the sets it needs (every worker
constructs it, in the same order); or register them yourself at start-up with
``hvd.init(process_sets=hvd_easgd.optim.hierarchy.process_sets(groups))``.

:class:`~hvd_easgd.optim.exchange.ExchangeStats` counts ``cross_group_bytes`` (what this worker hands to
collectives spanning groups: its slice of every round) and ``group_bytes`` (gradients and
allgathers inside its group).
"""

from __future__ import annotations

import hashlib
import operator
import os
import socket
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch

from hvd_easgd.optim import collectives
from hvd_easgd.optim.exchange import Communicator, ExchangeStats, Pending, average_gradients, nbytes

HOST = "host"
SETS_HINT = (
    "start Horovod with hvd.init(process_sets='dynamic') (or export "
    "HOROVOD_DYNAMIC_PROCESS_SETS=1) so that the optimizer can register them, or register them "
    "at start-up with hvd.init(process_sets=hvd_easgd.optim.hierarchy.process_sets(GROUPS))"
)


@dataclass
class Topology:
    """Who trains with whom: the groups (global ranks) and this worker's process sets."""

    groups: List[List[int]]
    group_index: int  # this worker's group: its "rank" among EASGD's peers
    local_index: int  # its position inside the group: the slice of a round it exchanges
    group_set: Optional[Any]  # its group (gradients, allgathers); None for one-worker groups
    cross_set: Any  # the local_index-th worker of every group (the EASGD exchange)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def group_size(self) -> int:
        return len(self.groups[0])

    @property
    def ranks(self) -> List[int]:
        return sorted(r for g in self.groups for r in g)

    def describe(self) -> str:
        return repr(self.groups)


EXAMPLE = "e.g. hierarchy=[[0, 1], [2, 3]] or hierarchy='host'"


def check_group_shape(groups: Any) -> List[List[int]]:
    """``groups`` as sorted lists of ranks, if it passes every check that needs no world size.

    Raises ValueError, naming the bad value and the fix, unless ``groups`` is a non-empty list of
    non-empty lists of ranks, each rank an ``int`` >= 0 (bool, float and str are refused, never
    rounded or parsed), no rank listed twice, and all groups of one size. Calls no Horovod
    function (nothing needs ``hvd.init()``): :func:`hvd_easgd.train.config.parse_hierarchy` runs it on
    ``optimizer.hierarchy`` before launch."""
    groups = [sorted(_rank(r, groups) for r in _listed(g, groups)) for g in _listed(groups, groups)]
    if not groups or not all(groups):
        raise ValueError(f"hierarchy needs groups of one rank or more, got {groups}; {EXAMPLE}")
    flat = [r for g in groups for r in g]
    twice = sorted({r for r in flat if flat.count(r) > 1})
    if twice:
        raise ValueError(f"hierarchy {groups} names rank(s) {twice} more than once: list each "
                         f"worker in exactly one group ({EXAMPLE})")
    if len({len(g) for g in groups}) > 1:
        raise ValueError(
            f"hierarchy groups differ in size ({', '.join(map(str, (len(g) for g in groups)))} "
            f"workers in {groups}): each group trains as one EASGD worker and exchanges its round "
            f"in equal slices, so every group needs the same number of workers. Launch the same "
            f"number of slots per host (-H host1:n,host2:n) or give equal groups explicitly"
        )
    return groups


def _listed(value: Any, groups: Any) -> list:
    """``value`` (the groups, or one group) as a list, if it is a collection of items."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"hierarchy must be 'host' or a list of lists of ranks ({EXAMPLE}), "
                         f"got {groups!r}")
    return list(value)


def _rank(value: Any, groups: Any) -> int:
    """``value`` as a rank: an int (not a bool) >= 0; anything else is a ValueError."""
    try:
        if isinstance(value, bool):
            raise TypeError(value)
        rank = operator.index(value)
    except TypeError:
        raise ValueError(
            f"hierarchy {groups!r} has rank {value!r} (a {type(value).__name__}): a rank is a "
            f"worker's hvd.rank(), an int, and nothing else is rounded or parsed into one; write "
            f"each rank as an int ({EXAMPLE})") from None
    if rank < 0:
        raise ValueError(f"hierarchy {groups!r} has rank {rank}: ranks are the workers' "
                         f"hvd.rank(), 0 and up ({EXAMPLE})")
    return rank


def check_groups(groups: Any, size: int, rank: int, *, every_rank: bool) -> List[List[int]]:
    """Explicit groups for a job of ``size`` workers, checked before any collective (every
    worker raises the same ValueError): :func:`check_group_shape`, every rank < ``size``, with
    ``every_rank`` every worker in a group, and ``rank`` in one."""
    groups = check_group_shape(groups)
    flat = [r for g in groups for r in g]
    outside = sorted(r for r in flat if r >= size)
    if outside:
        raise ValueError(f"hierarchy {groups} names rank(s) {outside}, but the job has {size} "
                         f"workers, ranks 0..{size - 1}: use only those ranks, or launch more "
                         f"workers")
    if every_rank and sorted(flat) != list(range(size)):
        missing = sorted(set(range(size)) - set(flat))
        raise ValueError(f"hierarchy {groups} leaves out rank(s) {missing}: every worker must be "
                         f"in a group (use process_set= for EASGD among some workers only)")
    if rank not in flat:
        raise ValueError(f"rank {rank} is in none of the groups {groups}")
    return groups


def host_groups() -> List[List[int]]:
    """The workers of each host, by Horovod's host name (a collective: every worker calls it)."""
    host = os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()
    everyone = collectives.allgather_object((host, collectives.rank()),
                                            name="hvd_easgd.optim.hierarchy.hosts")
    by_host: dict = {}
    for name, rank in everyone:
        by_host.setdefault(name, []).append(rank)
    return sorted((sorted(g) for g in by_host.values()), key=lambda g: g[0])


def cross_groups(groups: Sequence[Sequence[int]]) -> List[List[int]]:
    """The j-th worker of every group, for each j."""
    return [sorted(g[j] for g in groups) for j in range(len(groups[0]))]


def process_sets(groups: Sequence[Sequence[int]]) -> List[Any]:
    """``hvd.ProcessSet`` objects for ``hvd.init(process_sets=...)``: the groups and the cross
    sets a hierarchy over ``groups`` needs (sets of one worker or of everyone left out)."""
    groups = [sorted(g) for g in groups]
    everyone = sorted(r for g in groups for r in g)
    wanted = [g for g in groups + cross_groups(groups) if 1 < len(g) < len(everyone)]
    unique = [list(g) for g in dict.fromkeys(tuple(g) for g in wanted)]
    return [collectives.process_set(g) for g in unique]


def find_process_set(ranks: Sequence[int]) -> Any:
    """The registered process set with exactly these ranks, registering it if allowed."""
    ranks = sorted(ranks)
    if ranks == list(range(collectives.size())):
        return collectives.GLOBAL_SET
    found = collectives.registered_process_set(ranks)
    if found is not None:
        return found
    if os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS", "0").lower() in ("1", "true", "yes"):
        return collectives.add_process_set(ranks)
    raise ValueError(f"Horovod has no process set of ranks {ranks}: {SETS_HINT}")


def resolve(hierarchy: Any, process_set: Any, elastic: bool) -> Optional[Topology]:
    """The topology for ``hierarchy=`` / ``process_set=`` (None: flat EASGD over everyone)."""
    if hierarchy is None and (process_set is None or process_set is collectives.GLOBAL_SET):
        return None
    if elastic:
        raise ValueError(
            "hierarchy= and process_set= cannot be used under Horovod Elastic: it changes the "
            "workers, and the groups and process sets would no longer match them. Use flat "
            "EASGD for elastic jobs (drop hierarchy=/process_set=; every worker is then one "
            "EASGD peer), or keep the hierarchy and launch without --min-np/--max-np")
    if hierarchy is not None and process_set is not None:
        raise ValueError("give hierarchy= (groups of workers) or process_set= (EASGD among a "
                         "set's members), not both")
    size, rank = collectives.size(), collectives.rank()
    if process_set is not None:
        return _set_topology(process_set, rank)
    if isinstance(hierarchy, str):
        if hierarchy != HOST:
            raise ValueError(f"hierarchy={hierarchy!r}: use 'host' or explicit lists of ranks")
        groups = check_groups(host_groups(), size, rank, every_rank=True)
        if len(groups) == 1 or len(groups[0]) == 1:
            # A recipe written for a cluster, run on one machine (or one worker per host):
            # there is nothing to be hierarchical about.
            if len(groups) == 1 and rank == 0:
                warnings.warn(f"hierarchy='host' found a single host ({size} workers): running "
                              f"flat EASGD over all workers", stacklevel=3)
            return None
    else:
        groups = check_groups(hierarchy, size, rank, every_rank=True)
    mine = next(i for i, g in enumerate(groups) if rank in g)
    local = groups[mine].index(rank)
    sets = {tuple(g): find_process_set(g) for g in groups + cross_groups(groups) if len(g) > 1}
    group_set = sets.get(tuple(groups[mine]))
    cross = cross_groups(groups)[local]
    cross_set = sets[tuple(cross)] if len(cross) > 1 else None
    if cross_set is None:
        raise ValueError(f"hierarchy {groups} has one group: that is synchronous SGD, with nothing "
                         "for EASGD to do; use hvd.DistributedOptimizer, or several groups")
    return Topology(groups, mine, local, group_set, cross_set)


def _set_topology(process_set: Any, rank: int) -> Topology:
    ranks = getattr(process_set, "ranks", None)
    if getattr(process_set, "process_set_id", None) is None or not ranks:
        raise ValueError(f"process_set {process_set} is not registered with Horovod: {SETS_HINT}")
    if rank not in ranks:
        raise ValueError(
            f"process_set {sorted(ranks)} does not contain this worker (rank {rank}): create the "
            f"EASGD optimizer only on the set's members (if rank in ps.ranks), or pass a set "
            f"that includes this rank"
        )
    groups = [[r] for r in sorted(ranks)]
    return Topology(groups, sorted(ranks).index(rank), 0, None, process_set)


# ---------------------------------------------------------------------- collectives


def reduce_gradients(topology: Topology, params: List[torch.Tensor], stats: ExchangeStats,
                     name: str) -> None:
    """Average the gradients over this worker's group (synchronous SGD inside a node)."""
    if topology.group_set is not None:
        stats.count_group_bytes(average_gradients(params, name, topology.group_set))


def bounds(numel: int, parts: int, index: int) -> slice:
    """The ``index``-th of ``parts`` near-equal contiguous slices of ``range(numel)``."""
    step = -(-numel // parts)
    return slice(min(numel, index * step), min(numel, (index + 1) * step))


@dataclass
class SlicedPending(Pending):
    round_index: int = 0


class SlicedCommunicator(Communicator):
    """A round in slices: slice j over the cross set, then an allgather inside the group."""

    def __init__(self, compression: Any, name: str, stats: ExchangeStats,
                 topology: Topology) -> None:
        super().__init__(compression, name, stats)
        self.topology = topology

    def start(self, tensors: Sequence[torch.Tensor], round_index: int) -> Pending:
        n, j = self.topology.group_size, self.topology.local_index
        parts = [t[bounds(t.numel(), n, j)] for t in tensors]
        sent, outputs, contexts = self.wire.send(parts)
        started = time.perf_counter()
        handle = collectives.sum_into_async(sent, outputs, f"{self.name}.round{round_index}",
                                            self.topology.cross_set)
        self.stats.count_sent(nbytes(sent), allreduce=True)
        return SlicedPending(handle, tuple(contexts), started, round_index)

    def wait(self, pending: Pending,
             cancelled: Callable[[], bool] = lambda: False) -> List[torch.Tensor]:
        assert isinstance(pending, SlicedPending)
        outputs = collectives.wait(pending.handle, cancelled)
        parts = self.wire.receive(outputs, pending.contexts)
        handle = collectives.allgather_async(parts, f"{self.name}.gather{pending.round_index}",
                                             self.topology.group_set)
        result = list(collectives.wait(handle, cancelled))
        self.stats.count_group_bytes(nbytes(parts))
        self.stats.count_comm(time.perf_counter() - pending.started)
        return result


def make_communicator(topology: Optional[Topology], compression: Any, name: str,
                      stats: ExchangeStats) -> Communicator:
    if topology is None:
        return Communicator(compression, name, stats)
    if topology.group_set is None:  # one-worker groups: the whole round over the set
        return Communicator(compression, name, stats, topology.cross_set)
    return SlicedCommunicator(compression, name, stats, topology)


def start_workers(topology: Topology, tensors: List[torch.Tensor], signature: Any,
                  name: str) -> None:
    """What the constructor does over everyone, over a process set's members only: check that
    they agree (a digest of their signatures) and start them from the lowest rank's values."""
    digest = hashlib.sha256(repr(signature).encode()).digest()[:7]
    mine = torch.tensor([int.from_bytes(digest, "little")], dtype=torch.int64)
    everyone = collectives.allgather(mine, f"{name}.check", topology.cross_set)
    if len(set(everyone.tolist())) > 1:
        raise ValueError(
            f"workers' models or EASGD settings differ among ranks {topology.ranks}: every "
            "member of the process set must build the same model and wrap its optimizer with "
            "the same settings"
        )
    for index, tensor in enumerate(tensors):
        collectives.broadcast_(tensor, topology.ranks[0], f"{name}.start.{index}",
                               topology.cross_set)


def peer_set(topology: Optional[Topology]) -> Any:
    """The process set EASGD's peers form: every worker, or ``process_set=``'s members."""
    if topology is not None and topology.group_set is None:
        return topology.cross_set
    return collectives.GLOBAL_SET


def peer_ranks(topology: Optional[Topology]) -> List[int]:
    """The global ranks of the workers in :func:`peer_set`, in order."""
    return list(range(collectives.size())) if topology is None else topology.ranks


def peers(topology: Optional[Topology]) -> int:
    """EASGD's p: the workers, or the groups of ``hierarchy=`` / members of ``process_set=``."""
    return collectives.size() if topology is None else topology.num_groups
