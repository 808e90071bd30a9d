"""What a round reads and writes, with one owner: :class:`RoundState`.

The center buffers, the step and round counters, the switch point from synchronous SGD to EASGD,
the world (size, rank) and the rule for it, whether the workers are synced, and the statistics
belong to one :class:`RoundState` per optimizer. The round code (:mod:`hvd_easgd.optim.rounds`),
the non-finite guard (:mod:`hvd_easgd.optim.guard`) and the Horovod Elastic handler
(:mod:`hvd_easgd.optim.horovod_elastic`) change them only by calling its methods, so every
change of the loop state can be found here.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

from hvd_easgd.optim import collectives
from hvd_easgd.optim.center import CenterState, Counters
from hvd_easgd.optim.checks import resolve_coefficients
from hvd_easgd.optim.exchange import ExchangeStats
from hvd_easgd.optim.hierarchy import Topology, peers
from hvd_easgd.optim.outer import OuterRule
from hvd_easgd.optim.rules import ElasticRule, buffer_rule

Rule = Union[ElasticRule, OuterRule]


class RoundState:
    """The loop state of one :class:`~hvd_easgd.ElasticOptimizer`.

    Args:
        center: the center and round buffers (with the outer optimizer, when one moves it).
        stats: the counters the optimizer exposes as ``opt.stats``.
        method: the EASGD method (:data:`hvd_easgd.optim.rules.METHODS`).
        coefficients: ``(alpha, beta)`` as the user gave them (one of them None): resolved
            again for every world (:func:`hvd_easgd.optim.checks.resolve_coefficients`).
        master_momentum: MDOWNPOUR's momentum on the center.
        topology: ``hierarchy=`` / ``process_set=``'s groups; None for flat EASGD.
        sync_sgd_steps: synchronous-SGD steps before EASGD starts.
        synced: whether the workers start from one agreed state (False under Horovod Elastic
            until its first sync).
    """

    def __init__(self, center: CenterState, stats: ExchangeStats, *, method: str,
                 coefficients: Tuple[Optional[float], Optional[float]], master_momentum: float,
                 topology: Optional[Topology], sync_sgd_steps: int, synced: bool) -> None:
        self.center = center
        self.stats = stats
        self.counters = Counters()
        self.method = method
        self.sync_sgd_steps = sync_sgd_steps
        self.synced = synced
        self._coefficients = coefficients
        self._master_momentum = master_momentum
        self._topology = topology
        self.rule: Rule
        self.buffer_rule: ElasticRule
        self.world: Tuple[int, int]
        self.configure_world()
        center.allocate_rounds()

    # ------------------------------------------------------------------ the world

    @property
    def peers(self) -> int:
        """EASGD's p for the current world (:func:`hvd_easgd.optim.hierarchy.peers`)."""
        return peers(self._topology)

    @property
    def coefficients(self) -> Tuple[float, float]:
        """``(alpha, beta)`` for the current number of peers."""
        return resolve_coefficients(*self._coefficients, self.peers)

    @property
    def size(self) -> int:
        return self.world[0]

    @property
    def rank(self) -> int:
        return self.world[1]

    def world_changed(self) -> bool:
        """Whether Horovod's size or rank differ from the ones the rule was built for."""
        return (collectives.size(), collectives.rank()) != self.world

    def configure_world(self) -> None:
        """Rebuild everything that depends on the number of workers and this worker's rank."""
        self.rule = self._rule()
        self.buffer_rule = buffer_rule(self.peers)
        self.world = (collectives.size(), collectives.rank())

    def _rule(self) -> Rule:
        alpha, beta = self.coefficients
        center = self.center
        if center.outer is None:
            return ElasticRule(self.method, alpha, self.peers, self._master_momentum, beta)
        return OuterRule(self.method, alpha, self.peers, center.outer, center.groups,
                         center.centers, center.center_views)

    # ------------------------------------------------------------------ counters

    @property
    def step(self) -> int:
        return self.counters.step

    @property
    def round(self) -> int:
        return self.counters.round

    @property
    def in_sync_sgd(self) -> bool:
        """Whether the next step is a synchronous-SGD step (EASGD has not started yet)."""
        return self.counters.step < self.sync_sgd_steps

    def count_step(self) -> None:
        self.counters.count_step()
        self.stats.count_step()

    def begin_round(self) -> int:
        """Number a round and count it as sent; return its number."""
        self.counters.start_round()
        self.stats.count_round()
        return self.counters.round

    def begin_early_round(self) -> int:
        """Count a round sent ahead of its step; return the number it gets when its step
        comes (:meth:`take_early_round`)."""
        self.stats.count_round()
        return self.counters.round + 1

    def take_early_round(self) -> int:
        """The step of a round sent early has come: number it; return its number."""
        self.counters.start_round()
        return self.counters.round

    def drop_round(self, numbered: bool) -> None:
        """A round on the wire that nobody applies; ``numbered``: it had a round number."""
        if numbered:
            self.counters.drop_round()
        self.stats.count_dropped()

    def record_verdict(self, bad: bool, window: int) -> int:
        """Record whether a round (or synchronous-SGD step) was skipped for non-finite values;
        return how many of the last ``window`` were."""
        if bad:
            self.stats.count_skipped()
        return self.counters.record_round(bad, window)

    def restore_counters(self, counters: Counters) -> None:
        """Take the counters of a commit or a state dict."""
        self.counters.load(counters)

    def adopt_sync_sgd_steps(self, steps: int) -> None:
        """Take the switch point a state dict or the other workers agree on."""
        self.sync_sgd_steps = int(steps)

    # ------------------------------------------------------------------ syncing

    def agreed(self, step: int, rounds: int, sync_sgd_steps: int) -> None:
        """Take the loop state every worker agreed on after a Horovod Elastic reset: its
        counters (with a fresh non-finite window) and switch point, and count the workers as
        synced."""
        self.counters.load(Counters(step=int(step), round=int(rounds)))
        self.sync_sgd_steps = int(sync_sgd_steps)
        self.synced = True

    def loop_state(self) -> Tuple[int, int, int]:
        """``(step, round, sync_sgd_steps)``: what a resync hands from one worker to the others."""
        return self.counters.step, self.counters.round, self.sync_sgd_steps
