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
