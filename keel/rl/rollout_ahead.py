"""One-step off-policy rollouts (`rl.one_step_off_policy`): step t+1's rollouts are generated, in a
background thread, by the weights step t starts from, while step t trains.

    step t:  take R_t (ready) -> start R_t+1 on the engine (weights w_t) -> train on R_t: w_t -> w_t+1
             -> wait for R_t+1 -> push w_t+1 to the engine

So R_t was made by w_t-1 and trained on from w_t: one step stale. The truncated importance weights
between the trainer's recomputed log-probs and the engine's (rl.is_cap, required) correct for it, as
they correct for any engine/trainer mismatch. The first step collects on-policy (nothing is ready).

Why a thread is enough: the rollout engine keeps its own copy of the weights, so generating with w_t
while the trainer's copy moves to w_t+1 needs no lock; the push to the engine waits for the
generation to end. Generation overlaps training where the two do not compete for the same compute
(a GPU, or a CPU with cores to spare). Under torchrun the rollouts are gathered over their own
process group (RLRanks.rollout_group), so they never interleave with FSDP's collectives.

Resume: a checkpoint holds the ready rollouts. They cannot be made again (the weights that made them
are gone), and a resumed run must train on exactly what the uninterrupted run trained on.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

from keel.rl.engines.base import Rollout


@dataclass
class RolloutGroup:
    """One prompt's G rollouts and rewards, with the prompt's place in the prompt stream."""
    item: object  # the prompt item (keel/rl/prompts.py)
    position: int  # its position in the trainer's PromptStream
    prompt_ids: list[int]
    rollouts: list[Rollout]
    rewards: list[float]

    def to_state(self) -> dict:
        # Plain lists and floats: JSON keeps Python floats exactly (repr round-trips).
        return {"position": self.position, "prompt_ids": self.prompt_ids, "rewards": self.rewards,
                "rollouts": [[r.tokens, r.logprobs, r.finish_reason, r.prompt_index] for r in self.rollouts]}

    @classmethod
    def from_state(cls, state: dict, item_at: Callable[[int], object]) -> "RolloutGroup":
        rollouts = [Rollout(list(t), [float(x) for x in lp], reason, int(index))
                    for t, lp, reason, index in state["rollouts"]]
        return cls(item_at(int(state["position"])), int(state["position"]), list(state["prompt_ids"]), rollouts,
                   [float(r) for r in state["rewards"]])


class RolloutsAhead:
    """Runs `collect()` (-> (groups, metrics)) one step ahead in a background thread."""

    def __init__(self, collect: Callable[[], tuple]):
        self.collect = collect
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-rollouts-ahead")
        self.pending: Optional[Future] = None
        self.ready: Optional[tuple] = None  # (groups, metrics) of the next step, once generated

    def take(self) -> tuple:
        """This step's (groups, metrics): the ready ones, or collected now when none are (first step)."""
        self.finish()
        if self.ready is None:
            return self.collect()
        out, self.ready = self.ready, None
        return out

    def start(self) -> None:
        """Begin generating the next step's rollouts with the engine's current weights."""
        self.pending = self.pool.submit(self.collect)

    def finish(self) -> None:
        """Wait for the rollouts being generated (before the engine's weights may change)."""
        if self.pending is not None:
            future, self.pending = self.pending, None
            self.ready = future.result()  # re-raises the generation's error here, on the main thread

    def state_dict(self) -> dict:
        self.finish()
        if self.ready is None:
            return {}
        groups, metrics = self.ready
        return {"groups": [g.to_state() for g in groups], "metrics": metrics}

    def load_state_dict(self, state: dict, item_at: Callable[[int], object]) -> None:
        self.ready = None
        if state:
            self.ready = ([RolloutGroup.from_state(g, item_at) for g in state["groups"]], dict(state["metrics"]))
