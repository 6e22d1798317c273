import math

import numpy as np
import pytest
import torch

from nablagfn.common.transport import (SCHEMA_VERSION, RecordError, ScoredRecord,
                                       TrajectoryRecord, encode)
from nablagfn.common.transport.bench import synthetic_trajectory


def small_traj(**kw):
    """N=6 steps, K=3 kept, latents 2×4×4 fp32, with states and cond_emb (5, 8)."""
    args = dict(num_steps=6, kept=3, latent_shape=(2, 4, 4), latent_dtype="float32",
                cond_shape=(5, 8), seed=0)
    return synthetic_trajectory(**{**args, **kw})


def _scored(traj=None, **kw):
    traj = traj or small_traj()
    K, S = traj.num_kept, tuple(traj.tensors["final"].shape)
    args = dict(log_reward=-1.25, grad_final=torch.randn(S), reward_name="aesthetic",
                log_reward_x0=torch.randn(K), grad_x0=torch.randn(K, *S))
    args.update(kw)
    return ScoredRecord.from_trajectory(traj, **args)


def _assert_same(a, b):
    assert a.meta == b.meta
    assert set(a.tensors) == set(b.tensors)
    for k, t in a.tensors.items():
        u = b.tensors[k]
        assert u.dtype == t.dtype and torch.equal(u, t), k


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_trajectory_round_trip(dtype):
    rec = small_traj(latent_dtype=dtype)
    back = TrajectoryRecord.from_msg(rec.to_msg())
    _assert_same(rec, back)
    assert back.traj_id == rec.meta["traj_id"] and back.policy_version == 0 and back.num_kept == 3


def test_minimal_trajectory_without_optional_tensors():
    rec = small_traj(with_states=False, with_optional=False, cond_shape=None)
    _assert_same(rec, TrajectoryRecord.from_msg(rec.to_msg()))


def test_numpy_mode_gives_numpy_arrays():
    rec = small_traj(latent_dtype="float16")
    back = TrajectoryRecord.from_msg(rec.to_msg(), as_torch=False)
    assert isinstance(back.tensors["x_t"], np.ndarray)
    np.testing.assert_array_equal(back.tensors["x_t"], rec.tensors["x_t"].numpy())


def test_scored_round_trip_and_kind_is_checked():
    rec = _scored()
    back = ScoredRecord.from_msg(rec.to_msg())
    _assert_same(rec, back)
    assert back.log_reward == -1.25 and back.meta["reward_name"] == "aesthetic"
    with pytest.raises(RecordError, match="kind"):
        TrajectoryRecord.from_msg(rec.to_msg())
    with pytest.raises(RecordError, match="kind"):
        ScoredRecord.from_msg(small_traj().to_msg())


def _wire(rec, **override):
    obj = {"schema": SCHEMA_VERSION, "kind": rec.KIND, "meta": rec.meta, "tensors": rec.tensors}
    obj.update(override)
    return encode(obj)


def test_wrong_schema_version_named():
    rec = small_traj()
    for bad in (SCHEMA_VERSION + 1, 0, "1", None, True):
        with pytest.raises(RecordError, match="schema"):
            TrajectoryRecord.from_msg(_wire(rec, schema=bad))
    with pytest.raises(RecordError, match="record"):
        TrajectoryRecord.from_msg(encode([1, 2]))
    with pytest.raises(RecordError, match="unknown top-level"):
        TrajectoryRecord.from_msg(_wire(rec, extra=1))


@pytest.mark.parametrize("name", ["timesteps", "step_idx", "x_t", "x_next", "eps_behaviour",
                                  "final"])
def test_missing_tensor_named(name):
    rec = small_traj()
    del rec.tensors[name]
    with pytest.raises(RecordError, match=f"tensors.{name}: missing"):
        TrajectoryRecord.from_msg(_wire(rec))
    with pytest.raises(RecordError, match=f"tensors.{name}: missing"):
        rec.to_msg()  # the producer finds out first


def test_missing_scored_tensor_and_meta_named():
    rec = _scored()
    del rec.tensors["grad_final"]
    with pytest.raises(RecordError, match="tensors.grad_final: missing"):
        ScoredRecord.from_msg(_wire(rec))
    rec = _scored()
    del rec.meta["reward_name"]
    with pytest.raises(RecordError, match="meta.reward_name: missing"):
        rec.validate()


@pytest.mark.parametrize("name,shape", [
    ("x_t", (4, 2, 4, 4)),  # K mismatch
    ("x_next", (3, 2, 4, 5)),  # S mismatch
    ("eps_pretrained", (3, 2, 4)),
    ("states", (6, 2, 4, 4)),  # must be N+1
    ("timesteps", (5,)),  # must be N
    ("cond_emb", (5, 8, 1)),  # must be rank 2
    ("step_idx", (3, 1)),
])
def test_wrong_shape_named(name, shape):
    rec = small_traj()
    dtype = rec.tensors[name].dtype
    rec.tensors[name] = torch.zeros(shape, dtype=dtype)
    with pytest.raises(RecordError, match=f"tensors.{name}: shape"):
        TrajectoryRecord.from_msg(_wire(rec))


def test_scored_shapes_checked():
    with pytest.raises(RecordError, match="tensors.grad_x0: shape"):
        _scored(grad_x0=torch.zeros(2, 2, 4, 4)).validate()
    with pytest.raises(RecordError, match="tensors.grad_final: dtype float16"):
        _scored(grad_final=torch.zeros(2, 4, 4, dtype=torch.float16)).validate()


@pytest.mark.parametrize("name", ["x_t", "eps_behaviour", "final", "cond_emb", "states"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_named(name, value):
    rec = small_traj(latent_dtype="float16")
    t = rec.tensors[name].clone()
    t.view(-1)[1] = value
    rec.tensors[name] = t
    with pytest.raises(RecordError, match=f"tensors.{name}: 1 non-finite"):
        TrajectoryRecord.from_msg(_wire(rec))


def test_non_finite_reward_named():
    with pytest.raises(RecordError, match="meta.log_reward"):
        _scored(log_reward=math.nan).validate()
    g = torch.zeros(3, 2, 4, 4)
    g[0, 0, 0, 0] = math.inf
    with pytest.raises(RecordError, match="tensors.grad_x0"):
        ScoredRecord.from_msg(_wire(_scored(grad_x0=g)))


@pytest.mark.parametrize("key,value", [("policy_version", "3"), ("policy_version", True),
                                       ("num_steps", 6.0), ("run_id", 5), ("prompt", None),
                                       ("traj_id", ""), ("num_steps", 0), ("policy_version", -1)])
def test_meta_types_named(key, value):
    rec = small_traj()
    rec.meta[key] = value
    with pytest.raises(RecordError, match=f"meta.{key}"):
        TrajectoryRecord.from_msg(_wire(rec))


def test_extra_meta_allowed_only_for_plain_values():
    rec = small_traj()
    rec.meta["tags"] = ["a", 1, [2.5, True]]
    assert TrajectoryRecord.from_msg(rec.to_msg()).meta["tags"] == ["a", 1, [2.5, True]]
    rec.meta["nested"] = {"a": 1}
    with pytest.raises(RecordError, match="meta.nested"):
        rec.validate()


def test_dtype_and_values_checked():
    rec = small_traj()
    rec.tensors["x_t"] = rec.tensors["x_t"].double()
    with pytest.raises(RecordError, match="tensors.x_t: dtype float64"):
        TrajectoryRecord.from_msg(_wire(rec))
    rec = small_traj()
    rec.tensors["step_idx"] = rec.tensors["step_idx"].int()
    with pytest.raises(RecordError, match="tensors.step_idx: dtype int32"):
        rec.validate()
    rec = small_traj()
    rec.tensors["step_idx"] = torch.tensor([0, 2, 6])  # N = 6
    with pytest.raises(RecordError, match=r"tensors.step_idx: values in \[0, 6\]"):
        TrajectoryRecord.from_msg(_wire(rec))
    rec = small_traj()
    rec.tensors["bogus"] = torch.zeros(1)
    with pytest.raises(RecordError, match="tensors.bogus: unknown"):
        TrajectoryRecord.from_msg(_wire(rec))
    rec = small_traj()
    rec.tensors["x_t"] = [1.0, 2.0]
    with pytest.raises(RecordError, match="tensors.x_t: expected a tensor"):
        TrajectoryRecord.from_msg(_wire(rec))


def test_size_limit_applies_to_records():
    msg = small_traj().to_msg()
    with pytest.raises(RecordError, match="exceeds"):
        TrajectoryRecord.from_msg(msg, max_bytes=len(msg) // 2)


# -- schema 2: partial states, flow queries, forward points, query scores ----------------------
def queried_traj(**kw):
    """N=6, K=3 kept at steps (0, 3, 5); states 2..6 (state_idx), three state queries (2, 4, 5),
    one forward-point query on kept row 2 (state 6), with fwd_point."""
    rec = small_traj(**kw)
    S, dt = tuple(rec.tensors["final"].shape), rec.tensors["final"].dtype
    rec.tensors["step_idx"] = torch.tensor([2, 3, 5])
    rec.tensors["state_idx"] = torch.arange(2, 7)
    rec.tensors["states"] = torch.randn(5, *S).to(dt)
    rec.tensors["query_state"] = torch.tensor([2, 4, 5, 6])
    rec.tensors["query_row"] = torch.tensor([-1, -1, -1, 2])
    rec.tensors["query_x0"] = torch.randn(4, *S).to(dt)
    rec.tensors["fwd_point"] = torch.randn(3, *S).to(dt)
    return rec


def queried_scored(**kw):
    rec = queried_traj()
    S = tuple(rec.tensors["final"].shape)
    args = dict(log_reward=0.5, grad_final=torch.randn(S), reward_name="brightness",
                query_log_r=torch.randn(4), query_grad=torch.randn(4, *S))
    return ScoredRecord.from_trajectory(rec, **{**args, **kw})


def test_schema_version_is_three():
    assert SCHEMA_VERSION == 3  # schema 1 lacks the queries the learner needs, 2 the ε path


def test_queried_records_round_trip():
    rec = queried_traj(latent_dtype="float16")
    _assert_same(rec, TrajectoryRecord.from_msg(rec.to_msg()))
    sc = queried_scored()
    _assert_same(sc, ScoredRecord.from_msg(sc.to_msg()))


def test_partial_states_follow_state_idx():
    rec = queried_traj()
    rec.tensors["states"] = rec.tensors["states"][:4]
    with pytest.raises(RecordError, match=r"tensors.states: shape \(4, 2, 4, 4\), expected \(5, 2, 4, 4\)"):
        TrajectoryRecord.from_msg(_wire(rec))
    rec = queried_traj()
    del rec.tensors["states"]
    with pytest.raises(RecordError, match="tensors.states: missing"):
        rec.validate()
    for bad, msg in ((torch.tensor([2, 3, 3, 4, 5]), "strictly increasing"),
                     (torch.tensor([3, 4, 5, 6, 7]), r"state_idx: values in \[3, 7\]"),
                     (torch.tensor([[2, 3, 4, 5, 6]]), "state_idx: shape")):
        rec = queried_traj()
        rec.tensors["state_idx"] = bad
        with pytest.raises(RecordError, match=msg):
            TrajectoryRecord.from_msg(_wire(rec))


@pytest.mark.parametrize("state,row,match", [
    (6, -1, "terminal state 6 is `final`"),
    (1, -1, "state 1 is not carried"),
    (7, -1, r"query_state\[0\]: 7, expected \[0, 6\]"),
    (4, 0, r"expected step_idx\[0\] \+ 1 = 3"),
    (3, 3, r"query_row\[0\]: 3, expected -1 or \[0, 3\)"),
    (5, -1, "state 5 queried twice"),
])
def test_bad_queries_named(state, row, match):
    rec = queried_traj()
    rec.tensors["query_state"][0] = state
    rec.tensors["query_row"][0] = row
    with pytest.raises(RecordError, match=match):
        TrajectoryRecord.from_msg(_wire(rec))


def test_query_tensors_come_together():
    rec = queried_traj()
    del rec.tensors["query_x0"]
    with pytest.raises(RecordError, match="tensors.query_x0: missing"):
        rec.validate()
    rec = queried_traj()
    del rec.tensors["fwd_point"]
    with pytest.raises(RecordError, match="needs tensors.fwd_point"):
        rec.validate()
    rec = queried_traj()
    rec.tensors["query_x0"] = rec.tensors["query_x0"][:3]
    with pytest.raises(RecordError, match="tensors.query_x0: shape"):
        rec.validate()
    sc = queried_scored()
    del sc.tensors["query_grad"]
    with pytest.raises(RecordError, match="tensors.query_grad: missing"):
        ScoredRecord.from_msg(_wire(sc))
    with pytest.raises(RecordError, match="tensors.query_log_r: present without flow queries"):
        _scored(query_log_r=torch.zeros(3), query_grad=torch.zeros(3, 2, 4, 4)).validate()
    sc = queried_scored()
    del sc.tensors["query_x0"]  # allowed: the learner recomputes x̂₀
    assert ScoredRecord.from_msg(sc.to_msg()).tensors["query_row"].tolist() == [-1, -1, -1, 2]
    del sc.tensors["query_row"]
    with pytest.raises(RecordError, match="tensors.query_row: missing"):
        sc.validate()
    g = torch.zeros(4, 2, 4, 4)
    g[1, 0, 0, 0] = math.nan
    with pytest.raises(RecordError, match="tensors.query_grad: 1 non-finite"):
        queried_scored(query_grad=g).validate()
    with pytest.raises(RecordError, match="tensors.query_log_r: dtype float16"):
        queried_scored(query_log_r=torch.zeros(4, dtype=torch.float16)).validate()


def test_eps_path_follows_eps_idx():
    rec = queried_traj()
    S = tuple(rec.tensors["final"].shape)
    rec.tensors["eps_idx"] = torch.tensor([2, 4])
    rec.tensors["eps_path"] = torch.randn(2, *S)
    assert TrajectoryRecord.from_msg(rec.to_msg()).tensors["eps_idx"].tolist() == [2, 4]
    from nablagfn.common.transport.records import carried_eps
    assert carried_eps(rec.tensors) == {2, 3, 4, 5}
    for bad, msg in ((torch.tensor([4, 2]), "eps_idx: must be strictly increasing"),
                     (torch.tensor([2, 6]), r"eps_idx: values in \[2, 6\], expected \[0, 5\]"),
                     (torch.tensor([2, 3, 4]), r"eps_path: shape \(2, 2, 4, 4\), expected \(3, 2, 4, 4\)")):
        r = queried_traj()
        r.tensors["eps_idx"], r.tensors["eps_path"] = bad, rec.tensors["eps_path"]
        with pytest.raises(RecordError, match=msg):
            TrajectoryRecord.from_msg(_wire(r))
    del rec.tensors["eps_idx"]
    with pytest.raises(RecordError, match="tensors.eps_idx: missing"):
        rec.validate()
