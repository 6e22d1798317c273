"""`RewardWorker`: trajectory records in, scored records out (ARCHITECTURE.md, reward service).

One step:
1. take entries of `stream:traj` for this consumer of group `reward`: at start, those a previous
   incarnation under the same consumer name (`reward-{index}`, so a worker Ray restarts keeps it)
   read but never acked (XREADGROUP from id 0: no idle wait, it is dead); then those left pending
   longer than `reclaim_idle_ms` by another dead or stuck consumer (XAUTOCLAIM), else new ones
   (XREADGROUP, blocking up to `block_ms`);
2. decode and validate each (size limit before decoding, schema, shapes, dtypes, finite values);
   a bad one goes to the dead-letter stream with its reason and the worker carries on;
3. decode every query's x̂₀ and each final latent through the VAE in float32 and take log R and
   ∇_{x̂₀} log R (`VaeRewardScorer`: rewards_service/rewards `log_reward_and_grad`,
   `reward.chunk_size` per pass; a testbed without a VAE passes its own scorer);
4. a record any of whose rewards or gradients is not finite is dead-lettered ("non-finite
   reward ...") and counted, never passed on; the others become `ScoredRecord`s (query_x0 left
   out: the learner recomputes x̂₀) XADDed to `stream:scored`, waiting while it is full;
5. XACK (and delete) each trajectory entry and XADD its scored record in one server-side step
   (common/transport/accounting.py `write_and_ack`): a worker killed before it leaves the entry
   pending for a reclaim; an entry another worker settled first is skipped, so each trajectory
   becomes at most one scored record. Dead letters are counted in the run's accounting likewise.
Nothing is kept between messages but counters, so any number of workers can share the group.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch

from nablagfn.common.config import TrainConfig
from nablagfn.common.config_io import validate
from nablagfn.common.metrics import start_role_metrics
from nablagfn.common.transport import RecordError, ScoredRecord, StreamClient, TrajectoryRecord
from nablagfn.common.transport.accounting import Accounting
from nablagfn.common.transport.keys import REWARD_GROUP, RunKeys
from nablagfn.common.transport.records import check_model_shapes


def worker_device(device: str) -> torch.device:
    """cfg.device inside a worker: auto = the GPU Ray assigned it (if any), else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class VaeRewardScorer:
    """log R and ∇ log R of latents through the pipeline's VAE decoder in float32 and the configured
    reward (`log_reward_and_grad`, reward.chunk_size rows per pass)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, cache_dir: Optional[str] = None):
        from nablagfn.common.models import Denoiser, load_pipeline
        from nablagfn.common.trajectories import pipeline_latent_shape
        from nablagfn.rewards_service.rewards import build_reward

        pipe = load_pipeline(cfg.model, cache_dir=cache_dir, device=device)
        self.vae = pipe.vae.float()  # rewards in float32 (ALGORITHM.md §2); the rest is dropped
        # the latents this VAE decodes: a record of another size is dead-lettered, not batched
        self.latent_shape = pipeline_latent_shape(pipe, Denoiser.from_pipeline(pipe), cfg.model.resolution)
        del pipe
        self.reward = build_reward(cfg.reward, device)
        self.chunk = cfg.reward.chunk_size

    def __call__(self, latents: torch.Tensor, prompts: list[str]):
        from nablagfn.rewards_service.rewards import log_reward_and_grad

        return log_reward_and_grad(latents, self.vae, self.reward, prompts, chunk=self.chunk)


class RewardWorker:
    """Scores trajectory records (see the module docstring). `scorer(latents (R, *S) float32,
    prompts) -> (log_r (R,), grad (R, *S), valid (R,) bool)` defaults to `VaeRewardScorer`; a
    testbed without a VAE (the GMM benchmark) passes its own."""

    def __init__(self, cfg: TrainConfig, index: int, redis_url: str, cache_dir: Optional[str] = None,
                 scorer: Optional[Callable] = None):
        validate(cfg)
        self.cfg, self.index = cfg, int(index)
        self.name = f"reward-{self.index}"
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = worker_device(cfg.device)
        dc = cfg.distributed
        self.keys = RunKeys.from_config(dc)
        self.streams = StreamClient.from_config(dc.redis, redis_url)
        self.accounting = Accounting(self.streams, self.keys.accounting)
        self._own_history = True  # a restarted incarnation first takes what the dead one left pending
        for stream in self.keys.traj_streams:
            self.streams.ensure_group(stream, REWARD_GROUP)
        self.scorer = scorer if scorer is not None else VaeRewardScorer(cfg, self.device, cache_dir)
        self.counters = {"read": 0, "scored": 0, "dead_lettered": 0, "non_finite": 0, "reclaimed": 0,
                         "settled_elsewhere": 0, "seconds_scoring": 0.0, "seconds_paused": 0.0}
        self.metrics = start_role_metrics(dc.metrics, "reward", self.index, self.streams.conn, self.keys)

    def ready(self) -> str:
        return self.name

    def stop_requested(self) -> bool:
        return bool(self.streams.conn.call(self.streams.conn.client.exists, self.keys.stop_key))

    # -- consuming ----------------------------------------------------------------------------
    def take(self, block_ms: Optional[int] = None) -> list[tuple[str, str, bytes]]:
        """Entries to process: reclaimed ones from dead consumers first, else new ones."""
        dc = self.cfg.distributed
        out = self._take_own_history(dc.reward_batch) if self._own_history else []
        for stream in ([] if out else self.keys.traj_streams):
            got = self.streams.reclaim(stream, REWARD_GROUP, self.name, dc.reclaim_idle_ms, count=dc.reward_batch)
            out += [(stream, i, p) for i, p in got]
        self.counters["reclaimed"] += len(out)
        if not out:
            out = self.streams.read_many(self.keys.traj_streams, REWARD_GROUP, self.name, count=dc.reward_batch,
                                         block_ms=dc.block_ms if block_ms is None else block_ms)
        self.counters["read"] += len(out)
        return out

    def _take_own_history(self, count: int) -> list[tuple[str, str, bytes]]:
        """Entries pending on this consumer name (a dead incarnation's), oldest first; an entry
        pending but no longer in the stream is acked away."""
        conn = self.streams.conn
        out = []
        for stream in self.keys.traj_streams:
            reply = conn.call(conn.client.xreadgroup, REWARD_GROUP, self.name, {stream: "0"}, count=count)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                    if fields:
                        out.append((stream, eid, fields.get(b"d", b"")))
                    else:
                        self.streams.ack(stream, REWARD_GROUP, eid, delete=False)
        if not out:
            self._own_history = False
        return out

    def _decode(self, entries) -> list[tuple[str, str, bytes, TrajectoryRecord]]:
        good = []
        for stream, entry_id, payload in entries:
            try:
                rec = TrajectoryRecord.from_msg(payload, self.cfg.distributed.redis.max_record_bytes)
                shape = getattr(self.scorer, "latent_shape", None)  # a custom scorer may not say
                if shape is not None:
                    check_model_shapes(rec, shape)
                good.append((stream, entry_id, payload, rec))
            except RecordError as exc:
                self.accounting.dead_letter(stream, REWARD_GROUP, entry_id, payload, exc.reason)
                self.counters["dead_lettered"] += 1
        return good

    def score(self, records: list[TrajectoryRecord]) -> list[Optional[ScoredRecord] | str]:
        """A ScoredRecord per record, or the reason it cannot be trained on (non-finite reward)."""
        latents, prompts, spans = [], [], []
        for rec in records:
            x0 = rec.tensors.get("query_x0")
            rows = [] if x0 is None else [x0.float()]
            rows.append(rec.tensors["final"].float()[None])
            block = torch.cat(rows)
            spans.append(block.shape[0])
            latents.append(block)
            prompts += [rec.meta["prompt"]] * block.shape[0]
        if not records:
            return []
        res_log_r, res_grad, res_valid = self.scorer(torch.cat(latents), prompts)
        log_r = res_log_r.detach().float().cpu()
        grad = res_grad.detach().float().cpu()
        valid = res_valid.cpu() & torch.isfinite(log_r) & torch.isfinite(grad).flatten(1).all(1)
        out: list[Optional[ScoredRecord] | str] = []
        start = 0
        for rec, n in zip(records, spans):
            sl = slice(start, start + n)
            start += n
            if not bool(valid[sl].all()):
                bad = (~valid[sl]).nonzero(as_tuple=True)[0].tolist()
                where = ["final" if i == n - 1 else f"query {i}" for i in bad]
                out.append(f"non-finite reward (log R or its gradient) at {', '.join(where)}")
                continue
            tensors = {k: v for k, v in rec.tensors.items() if k != "query_x0"}
            base = TrajectoryRecord(meta=rec.meta, tensors=tensors)
            extra = {}
            if n > 1:
                extra = {"query_log_r": log_r[sl][:-1].contiguous(), "query_grad": grad[sl][:-1].contiguous()}
            out.append(ScoredRecord.from_trajectory(
                base, log_reward=float(log_r[sl][-1]), grad_final=grad[sl][-1].contiguous(),
                reward_name=self.cfg.reward.name, **extra))
        return out

    def _write_and_ack(self, src: str, entry_id: str, scored: ScoredRecord) -> Optional[bool]:
        """Write `scored` and ack its trajectory entry in one step, waiting while the scored
        stream is full: True when written, None when the entry was settled elsewhere, False if
        stopped while waiting (the entry stays pending)."""
        dc = self.cfg.distributed
        msg = scored.to_msg(max_bytes=dc.redis.max_record_bytes)
        stream = self.keys.scored_stream_for(scored.traj_id)
        t0 = None
        while True:
            got = self.accounting.write_and_ack(src, REWARD_GROUP, entry_id, stream, msg,
                                                max_depth=dc.redis.max_stream_depth)
            if got is not False:
                break
            t0 = t0 or time.perf_counter()
            if self.stop_requested():
                return False
            time.sleep(dc.poll_s)
        if t0:
            self.counters["seconds_paused"] += time.perf_counter() - t0
        return None if got is None else True

    def process(self, entries: list[tuple[str, str, bytes]]) -> int:
        """Validate, score, write and ack `entries`; returns the scored records written. An entry
        whose write was interrupted by the stop key stays pending (another worker reclaims it)."""
        good = self._decode(entries)
        if not good:
            return 0
        t0 = time.perf_counter()
        results = self.score([rec for *_, rec in good])
        self.counters["seconds_scoring"] += time.perf_counter() - t0
        self.metrics.reward_batch(time.perf_counter() - t0, results)
        written = 0
        for (stream, entry_id, payload, _), result in zip(good, results):
            if isinstance(result, str):
                self.accounting.dead_letter(stream, REWARD_GROUP, entry_id, payload, result)
                self.counters["non_finite"] += 1
                self.counters["dead_lettered"] += 1
                continue
            done = self._write_and_ack(stream, entry_id, result)  # the ack only with the downstream write
            if done is False:
                break
            if done is None:
                self.counters["settled_elsewhere"] += 1
                continue
            written += 1
        self.counters["scored"] += written
        return written

    def step(self, block_ms: Optional[int] = None) -> int:
        written = self.process(self.take(block_ms))
        self.metrics.sync(self.counters)
        return written

    def run(self, max_steps: Optional[int] = None) -> dict[str, Any]:
        """Steps until the stop key is set (or max_steps); returns `stats()`."""
        done = 0
        while (max_steps is None or done < max_steps) and not self.stop_requested():
            self.step()
            done += 1
        return self.stats()

    def stats(self) -> dict[str, Any]:
        return {"actor": self.name, **self.counters}

    def close(self) -> None:
        self.metrics.close()
        self.streams.close()
