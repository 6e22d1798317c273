"""Bad input through the consumers (issue 6, item 2), not just the decoder: hypothesis XADDs random
bytes and well-formed-but-wrong records (wrong schema version or kind, wrong dtypes or shapes,
NaN/Inf tensors or rewards, missing fields, oversized, and for the learner records of another run or
from the future) into a real embedded Redis stream, then runs the real `RewardWorker.step` and the
real `StreamLearner.update` (tiny SD pipeline). Every bad entry lands in the dead-letter stream, in
order, with a reason naming what was wrong; the role's dead-letter counter and its Prometheus
series (scraped over HTTP from the role's own endpoint) rise by exactly that many; and the valid
record XADDed after them is still scored / trained, so the consumer kept going.

NaN/Inf from the reward model (worker side) and in scored records (learner side) are checked
explicitly too: skipped, dead-lettered, counted, never trained on.

The worker and the learner are built once per module, in their own namespaces ("w": the worker's
output is read back and trimmed here; "": the learner, whose version 0 the sampler loads to make
the valid records). max_examples is small: each example is one real consumer step."""
from __future__ import annotations

import re
import urllib.request
import uuid

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from nablagfn.actors.sampler_actor import SamplerActor
from nablagfn.cli import load_preset
from nablagfn.common.config import TrainConfig
from nablagfn.common.config_io import build_config
from nablagfn.common.transport import (SCHEMA_VERSION, RecordError, ScoredRecord, StreamClient,
                                       TrajectoryRecord, encode, start_embedded_redis)
from nablagfn.common.transport.keys import RunKeys
from nablagfn.common.transport.records import check_model_shapes
from nablagfn.learner.learner_actor import LearnerActor
from nablagfn.rewards_service.worker import RewardWorker

RUN = "run-bad-input"
MAX_BYTES = 200_000  # valid tiny records are ~50 kB
SMALL = ["sampler.num_steps=4", "batch_trajectories=1", "train_batch_trajectories=0", "chunk_trajectories=4",
         "flow_net.block_out_channels=[32]", "subsample.timestep_fraction=0.5", "objective.reward_scale=1e4",
         "threads=1", "distributed.sampler_batch=2", "distributed.block_ms=20", "distributed.poll_s=0.01",
         "distributed.reward_batch=4", f"distributed.redis.max_record_bytes={MAX_BYTES}",
         "distributed.metrics.port_range=[9400,9599]"]
EXAMPLES = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
          "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool}


def _cfg(tiny_dir, run_dir, *extra):
    return build_config(TrainConfig, load_preset("tiny"), {"updates": 10_000, "run_dir": str(run_dir), "progress": False},
                        overrides=[f"model.pretrained={tiny_dir}", *SMALL, *extra])


class Stack:
    """The consumers under test, their streams and templates of a valid record of each kind."""

    def __init__(self, tiny_dir, tmp):
        self.server = start_embedded_redis(tmp / "redis")
        url = self.server.url
        self.cfg = _cfg(tiny_dir, tmp / "run")
        self.wcfg = _cfg(tiny_dir, tmp / "run", "distributed.namespace=w")
        self.learner = LearnerActor(self.cfg, url, RUN)  # publishes version 0
        self.worker = RewardWorker(self.wcfg, 0, url)
        sampler = SamplerActor(self.cfg, 0, url, RUN)
        assert sampler.wait_for_policy(5)
        self.traj = sampler.sample_records()[0]
        sampler.close()
        (self.scored,) = self.worker.score([self.traj])
        assert isinstance(self.scored, ScoredRecord)
        self.client = StreamClient.from_url(url)
        self.traj_stream = RunKeys.from_config(self.wcfg.distributed).traj_streams[0]
        self.worker_out = RunKeys.from_config(self.wcfg.distributed).scored_streams[0]
        self.scored_stream = RunKeys.from_config(self.cfg.distributed).scored_streams[0]

    def fresh_traj(self) -> TrajectoryRecord:
        return TrajectoryRecord(meta={**self.traj.meta, "traj_id": uuid.uuid4().hex}, tensors=self.traj.tensors)

    def fresh_scored(self) -> ScoredRecord:
        return ScoredRecord(meta={**self.scored.meta, "traj_id": uuid.uuid4().hex,
                                  "policy_version": self.learner.version}, tensors=self.scored.tensors)

    def close(self):
        self.worker.close()
        self.learner.close()
        self.client.close()
        self.server.stop()


@pytest.fixture(scope="module")
def stack(tiny_dir, tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    s = Stack(tiny_dir, tmp_path_factory.mktemp("bad_input"))
    yield s
    s.close()
    torch.set_num_threads(before)


def scrape_total(url: str, name: str) -> float:
    """Sum of the series `name` in one HTTP scrape of a role's endpoint."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


# -- the bad inputs --------------------------------------------------------------------------------
def _wire(rec: TrajectoryRecord) -> dict:
    return {"schema": SCHEMA_VERSION, "kind": rec.KIND, "meta": dict(rec.meta), "tensors": dict(rec.tensors)}


@st.composite
def bad_entry(draw, template: TrajectoryRecord, learner_version: int | None = None):
    """(payload, regex its dead-letter reason must match) for one bad entry made from `template`.

    Every mutation makes the record invalid for sure (e.g. a dtype change picks a dtype the schema
    does not allow for that tensor; a shape change breaks a size the schema ties to another tensor)."""
    ways = ["bytes", "schema", "kind", "dtype", "shape", "nonfinite", "oversized", "missing", "meta_type"]
    if learner_version is not None:
        ways += ["other_run", "future_version", "nonfinite_log_reward"]
    how = draw(st.sampled_from(ways))
    event(how)  # --hypothesis-show-statistics lists how often each kind was sent
    obj = _wire(template)
    meta, tensors, spec = obj["meta"], obj["tensors"], template.TENSORS
    if how == "bytes":
        return draw(st.binary(max_size=256)), r".+"
    if how == "schema":
        obj["schema"] = draw(st.one_of(st.integers(-5, 10).filter(lambda v: v != SCHEMA_VERSION),
                                       st.none(), st.text(max_size=3)))
        return encode(obj), r"^schema: version"
    if how == "kind":
        obj["kind"] = draw(st.sampled_from(["trajectory", "scored", "", "x"]).filter(lambda k: k != template.KIND))
        return encode(obj), r"^kind: "
    if how == "dtype":
        name = draw(st.sampled_from(sorted(tensors)))
        to = draw(st.sampled_from(sorted(set(_TORCH) - spec[name][1])))
        tensors[name] = tensors[name].to(_TORCH[to])
        return encode(obj), rf"^tensors\.{name}: dtype {to}"
    if how == "shape":  # cond_emb's (L, D) is tied to no other tensor: see the model-shape tests below
        name = draw(st.sampled_from(sorted(set(tensors) - {"cond_emb"})))
        shape = list(tensors[name].shape)
        change = draw(st.sampled_from(["dim", "add", "drop"] if shape else ["add"]))
        if change == "dim":
            i = draw(st.integers(0, len(shape) - 1))
            shape[i] += draw(st.sampled_from([-1, 1]))
        elif change == "add":
            shape.append(draw(st.integers(1, 2)))
        else:
            shape.pop()
        tensors[name] = torch.zeros(shape, dtype=tensors[name].dtype)
        return encode(obj), r"^tensors\.\w+: "
    if how == "nonfinite":
        name = draw(st.sampled_from(sorted(n for n, t in tensors.items() if t.is_floating_point())))
        t = tensors[name].clone().reshape(-1)
        t[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        tensors[name] = t.reshape(tensors[name].shape)
        return encode(obj), rf"^tensors\.{name}: 1 non-finite values"
    if how == "oversized":
        meta["pad"] = "x" * (MAX_BYTES + draw(st.integers(1, 1000)))
        return encode(obj), rf"exceeds the limit of {MAX_BYTES}"
    if how == "missing":
        required = [f"tensors.{n}" for n, (req, _, _) in spec.items() if req]
        required += [f"meta.{k}" for k in template.META]
        where = draw(st.sampled_from(sorted(required)))
        section, key = where.split(".")
        obj[section].pop(key)
        return encode(obj), rf"^{re.escape(where)}: missing"
    if how == "meta_type":
        key = draw(st.sampled_from(sorted(template.META)))
        wrong = 7 if template.META[key][1] == "str" else draw(st.sampled_from(["7", True, [1]]))
        meta[key] = wrong
        return encode(obj), rf"^meta\.{key}: expected"
    if how == "other_run":
        meta["run_id"] = "someone-else"
        return encode(obj), r"^meta\.run_id: 'someone-else', expected"
    if how == "future_version":
        meta["policy_version"] = learner_version + draw(st.integers(1, 5))
        return encode(obj), r"^meta\.policy_version: \d+ is newer than the learner's"
    meta["log_reward"] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    return encode(obj), r"^meta\.log_reward: non-finite float"


def _check_dead_letters(client, stream, start, bad):
    """The dead letters after index `start` are `bad`, in order, each with a matching reason."""
    dead = client.dead_letters(stream, count=100_000)[start:]
    assert len(dead) == len(bad)
    for d, (payload, pattern) in zip(dead, bad):
        assert d["payload"] == payload
        assert re.search(pattern, d["reason"]), (pattern, d["reason"])


# -- the consumers keep going ----------------------------------------------------------------------
def _enqueue(consumer, client, stream, bad, good):
    """The bad entries, then one valid record, onto `stream`; the consumer's dead-letter count, its
    scraped metric and the stream's dead letters before them."""
    before = (consumer.counters["dead_lettered"], scrape_total(consumer.metrics.url, "nablagfn_dead_lettered_total"),
              len(client.dead_letters(stream, count=100_000)))
    for payload, _ in bad:
        assert client.add(stream, payload, max_depth=1000)
    assert client.add(stream, good.to_msg(), max_depth=1000)
    return before


@EXAMPLES
@given(data=st.data())
def test_reward_worker_dead_letters_bad_entries_and_keeps_going(stack, data):
    bad = data.draw(st.lists(bad_entry(stack.traj), min_size=1, max_size=3))
    w, client = stack.worker, stack.client
    good = stack.fresh_traj()
    counted, scraped, start = _enqueue(w, client, stack.traj_stream, bad, good)
    written = 0
    for _ in range(4):
        written += w.step(block_ms=10)
        if client.depth(stack.traj_stream) == 0:
            break
    assert written == 1 and client.depth(stack.traj_stream) == 0
    _check_dead_letters(client, stack.traj_stream, start, bad)
    assert w.counters["dead_lettered"] == counted + len(bad)
    assert scrape_total(w.metrics.url, "nablagfn_dead_lettered_total") == scraped + len(bad)
    out = [ScoredRecord.from_msg(f[b"d"]) for _, f in client.conn.client.xrange(stack.worker_out)]
    assert [s.traj_id for s in out] == [good.traj_id]
    client.conn.client.xtrim(stack.worker_out, maxlen=0)


@EXAMPLES
@given(data=st.data())
def test_learner_dead_letters_bad_entries_and_keeps_going(stack, data):
    lrn, client = stack.learner, stack.client
    bad = data.draw(st.lists(bad_entry(stack.fresh_scored(), lrn.version), min_size=1, max_size=3))
    good = stack.fresh_scored()
    counted, scraped, start = _enqueue(lrn, client, stack.scored_stream, bad, good)
    m = lrn.update()
    assert m["traj_ids"] == [good.traj_id]  # trained on the valid record only
    assert client.depth(stack.scored_stream) == 0  # every entry acked or dead-lettered
    _check_dead_letters(client, stack.scored_stream, start, bad)
    assert lrn.counters["dead_lettered"] == counted + len(bad) == m["dead_lettered_total"]
    assert scrape_total(lrn.metrics.url, "nablagfn_dead_lettered_total") == scraped + len(bad)


# -- NaN/Inf rewards and gradients never reach the optimizer ---------------------------------------
class PoisonedScorer:
    """The real scorer, with a NaN ∇log R at the final latent of prompt 'nan-grad' (log R finite)
    and an Inf log R at the first query of prompt 'inf-query'."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, latents, prompts):
        log_r, grad, valid = self.inner(latents, prompts)
        log_r, grad = log_r.clone(), grad.clone()
        for i, p in enumerate(prompts):
            last = i + 1 == len(prompts) or prompts[i + 1] != p  # rows of a record: queries, then final
            if p == "nan-grad" and last:
                grad[i].view(-1)[0] = float("nan")
            if p == "inf-query" and (i == 0 or prompts[i - 1] != p):
                log_r[i] = float("inf")
        return log_r, grad, valid


def test_non_finite_rewards_from_the_reward_model_are_skipped_and_counted(stack):
    w, client = stack.worker, stack.client
    before = dict(w.counters)
    scraped = scrape_total(w.metrics.url, "nablagfn_non_finite_rewards_total")
    start = len(client.dead_letters(stack.traj_stream, count=100_000))
    nan_grad = TrajectoryRecord(meta={**stack.fresh_traj().meta, "prompt": "nan-grad"}, tensors=stack.traj.tensors)
    inf_query = TrajectoryRecord(meta={**stack.fresh_traj().meta, "prompt": "inf-query"}, tensors=stack.traj.tensors)
    good = stack.fresh_traj()
    inner, w.scorer = w.scorer, PoisonedScorer(w.scorer)
    try:
        for rec in (nan_grad, inf_query, good):
            assert client.add(stack.traj_stream, rec.to_msg(), max_depth=1000)
        assert w.step(block_ms=10) == 1
    finally:
        w.scorer = inner
    dead = client.dead_letters(stack.traj_stream, count=100_000)[start:]
    assert [d["reason"] for d in dead] == ["non-finite reward (log R or its gradient) at final",
                                           "non-finite reward (log R or its gradient) at query 0"]
    assert w.counters["non_finite"] == before["non_finite"] + 2
    assert w.counters["dead_lettered"] == before["dead_lettered"] + 2
    assert scrape_total(w.metrics.url, "nablagfn_non_finite_rewards_total") == scraped + 2
    out = [ScoredRecord.from_msg(f[b"d"]) for _, f in client.conn.client.xrange(stack.worker_out)]
    assert [s.traj_id for s in out] == [good.traj_id]  # only the finite one goes on to the learner
    client.conn.client.xtrim(stack.worker_out, maxlen=0)


def test_non_finite_scored_records_never_reach_the_optimizer(stack):
    lrn, client = stack.learner, stack.client
    start = len(client.dead_letters(stack.scored_stream, count=100_000))
    counted = lrn.counters["dead_lettered"]
    poisoned = []
    for name in ("grad_final", "query_grad", "query_log_r"):
        rec = stack.fresh_scored()
        t = rec.tensors[name].clone()
        t.view(-1)[-1] = float("nan")
        poisoned.append(ScoredRecord(meta=rec.meta, tensors={**rec.tensors, name: t}))
    msgs = [p.to_msg(validate=False) for p in poisoned]
    msgs.append(encode({**_wire(stack.fresh_scored()), "meta": {**stack.fresh_scored().meta, "log_reward": float("nan")}}))
    for m in msgs:
        assert client.add(stack.scored_stream, m, max_depth=1000)
    good = stack.fresh_scored()
    assert client.add(stack.scored_stream, good.to_msg(), max_depth=1000)
    m = lrn.update()
    assert m["traj_ids"] == [good.traj_id] and lrn.counters["dead_lettered"] == counted + 4
    assert all(isinstance(m[k], float) and m[k] == m[k] for k in ("loss", "grad_norm_lora"))  # finite update
    reasons = [d["reason"] for d in client.dead_letters(stack.scored_stream, count=100_000)[start:]]
    assert reasons == ["tensors.grad_final: 1 non-finite values (NaN/Inf)",
                       "tensors.query_grad: 1 non-finite values (NaN/Inf)",
                       "tensors.query_log_r: 1 non-finite values (NaN/Inf)",
                       "meta.log_reward: non-finite float nan"]


# -- records of another model: self-consistent, wrong for this consumer ----------------------------
def _resized(rec: TrajectoryRecord, factor: int = 2) -> TrajectoryRecord:
    """`rec` with every latent tensor at 1/factor of the height and width (a consistent record of
    another resolution: schema-valid)."""
    S = tuple(rec.tensors["final"].shape)
    small = (S[0], S[1] // factor, S[2] // factor)
    tensors = {k: (torch.zeros(*v.shape[:v.dim() - 3], *small, dtype=v.dtype)
                   if k != "cond_emb" and v.is_floating_point() and tuple(v.shape[-3:]) == S else v)
               for k, v in rec.tensors.items()}
    out = type(rec)(meta={**rec.meta, "traj_id": uuid.uuid4().hex}, tensors=tensors)
    out.validate()
    return out


def test_check_model_shapes_names_the_field(stack):
    S, cond = tuple(stack.traj.tensors["final"].shape), tuple(stack.traj.tensors["cond_emb"].shape)
    check_model_shapes(stack.traj, S, cond)
    check_model_shapes(stack.scored, S, cond)
    with pytest.raises(RecordError, match=r"^tensors\.final: shape \(4, 8, 8\), expected the model's latent shape \(4, 16, 16\)"):
        check_model_shapes(_resized(stack.traj), S, cond)
    other = ScoredRecord(meta=stack.scored.meta, tensors={**stack.scored.tensors, "cond_emb": torch.zeros(3, 5)})
    other.validate()  # (L, D) is only checked for rank by the schema
    with pytest.raises(RecordError, match=r"^tensors\.cond_emb: shape \(3, 5\), expected the text encoder's \(77, 32\)"):
        check_model_shapes(other, S, cond)


def test_worker_dead_letters_a_record_of_another_resolution(tiny_dir, tmp_path, stack):
    cfg = _cfg(tiny_dir, tmp_path / "run", "distributed.namespace=gap")
    worker = RewardWorker(cfg, 0, stack.server.url)
    keys = RunKeys.from_config(cfg.distributed)
    try:
        good, other = stack.fresh_traj(), _resized(stack.fresh_traj())
        for rec in (good, other):
            assert stack.client.add(keys.traj_streams[0], rec.to_msg(), max_depth=1000)
        assert worker.step(block_ms=10) == 1  # the good one scored; mixed sizes never reach torch.cat
        (dead,) = stack.client.dead_letters(keys.traj_streams[0])
        assert dead["reason"].startswith("tensors.final: shape (4, 8, 8)")
    finally:
        worker.close()


@pytest.mark.parametrize("change", ["resolution", "cond_emb"])
def test_learner_dead_letters_a_record_of_another_model(tiny_dir, tmp_path, stack, change):
    cfg = _cfg(tiny_dir, tmp_path / "run", f"distributed.namespace=gap{change.replace('_', '')}")
    lrn = LearnerActor(cfg, stack.server.url, RUN)
    stream = RunKeys.from_config(cfg.distributed).scored_streams[0]
    try:
        base = ScoredRecord(meta={**stack.scored.meta, "policy_version": lrn.version}, tensors=stack.scored.tensors)
        if change == "resolution":
            other = _resized(base)
        else:
            other = ScoredRecord(meta={**base.meta, "traj_id": uuid.uuid4().hex},
                                 tensors={**base.tensors, "cond_emb": torch.zeros(3, 5)})
        good = ScoredRecord(meta={**base.meta, "traj_id": uuid.uuid4().hex}, tensors=base.tensors)
        for rec in (other, good):
            assert stack.client.add(stream, rec.to_msg(), max_depth=1000)
        m = lrn.update()  # the other model's record is dead-lettered before batching
        assert m["traj_ids"] == [good.traj_id] and lrn.counters["dead_lettered"] == 1
    finally:
        lrn.close()
