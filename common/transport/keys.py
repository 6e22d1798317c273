"""The Redis names one distributed run uses, in one place (driver, actors, workers, learner).

Every name is prefixed with `namespace:` when a namespace is set, so several runs can share one
Redis. Streams shard as `stream:traj:{shard}` when num_shards > 1 (streams.py); a producer picks
the shard from the trajectory id (`shard_for`), a consumer reads them all.

- `traj_streams` / `scored_streams`: the two queues (consumer groups `reward` and `learner`);
- `lora_prefix`: the LoRA registry (`lora:{v}`, `lora:latest`, `lora:versions`);
- `stop_key`: set by the driver when the run is over; every loop polls it between batches;
- `metrics_stream`: one msgpack map per learner update, tailed by the driver (plain XREAD);
- `accounting`: a hash of the run's record counters (accounting.py: produced, scored, trained, ...);
- `actor_name(run_id, role, i)`: the Ray actor names ("{run_id}:sampler:0"), for operators and tests.
"""
from __future__ import annotations

from dataclasses import dataclass

from .streams import SCORED_STREAM, TRAJ_STREAM, shard_for, stream_name, stream_names

REWARD_GROUP = "reward"
LEARNER_GROUP = "learner"


@dataclass(frozen=True)
class RunKeys:
    namespace: str = ""
    num_shards: int = 1

    @classmethod
    def from_config(cls, dcfg) -> "RunKeys":
        """From a DistributedConfig (namespace, redis.num_shards)."""
        return cls(dcfg.namespace, dcfg.redis.num_shards)

    def key(self, name: str) -> str:
        return f"{self.namespace}:{name}" if self.namespace else name

    @property
    def traj_streams(self) -> list[str]:
        return stream_names(self.key(TRAJ_STREAM), self.num_shards)

    @property
    def scored_streams(self) -> list[str]:
        return stream_names(self.key(SCORED_STREAM), self.num_shards)

    def traj_stream_for(self, traj_id: str) -> str:
        return stream_name(self.key(TRAJ_STREAM), shard_for(traj_id, self.num_shards))

    def scored_stream_for(self, traj_id: str) -> str:
        return stream_name(self.key(SCORED_STREAM), shard_for(traj_id, self.num_shards))

    @property
    def lora_prefix(self) -> str:
        return self.key("lora")

    @property
    def stop_key(self) -> str:
        return self.key("control:stop")

    @property
    def metrics_stream(self) -> str:
        return self.key("stream:metrics")

    @property
    def accounting(self) -> str:
        return self.key("accounting")


def actor_name(run_id: str, role: str, index: int = 0) -> str:
    """The Ray name of a run's actor: "{run_id}:{role}:{index}" (ray.get_actor finds it)."""
    return f"{run_id}:{role}:{int(index)}"
