"""Property: whatever bytes arrive, decode/from_msg raise RecordError or return a valid record —
never another exception (a consumer must be able to dead-letter anything and keep running)."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nablagfn.common.transport import (DTYPES, SCHEMA_VERSION, RecordError, ScoredRecord,
                                       TrajectoryRecord, decode, encode)
from nablagfn.common.transport.bench import synthetic_trajectory
from nablagfn.common.transport.records import SCORED_TENSORS, TRAJECTORY_META

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
_VALID = synthetic_trajectory(num_steps=4, kept=2, latent_shape=(2, 2), latent_dtype="float32",
                              cond_shape=(2, 3))
# schema 2/3 parts too, so mutations reach the query and ε-path rules: a trajectory-state query at
# state 1 (row -1, carried by `states`) and the behaviour ε at steps 1, 2
_VALID.tensors.update(query_state=np.array([1]), query_row=np.array([-1]), query_x0=np.zeros((1, 2, 2), np.float32),
                      eps_idx=np.array([1, 2]), eps_path=np.zeros((2, 2, 2), np.float32))
_VALID.validate()
_VALID_MSG = _VALID.to_msg()


def _only_record_errors(data: bytes) -> None:
    for fn in (decode, lambda d: decode(d, as_torch=True), TrajectoryRecord.from_msg,
               ScoredRecord.from_msg,
               lambda d: TrajectoryRecord.from_msg(d, as_torch=False)):
        try:
            out = fn(data)
        except RecordError:
            continue
        if isinstance(out, TrajectoryRecord):
            out.validate()  # what from_msg returns is valid


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    _only_record_errors(data)


@SETTINGS
@given(st.data())
def test_mutated_valid_message(data):
    msg = bytearray(_VALID_MSG)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(msg) - 1))
        msg[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(msg)))
    _only_record_errors(bytes(msg[:cut] if data.draw(st.booleans()) else msg))


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                     st.binary(max_size=8))
_values = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                     st.dictionaries(st.text(max_size=4), c,
                                                                     max_size=3)), max_leaves=6)


@st.composite
def _arrays(draw):
    dtype = draw(st.sampled_from([d for d in DTYPES if d != "bfloat16"]))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
    arr = np.zeros(shape, dtype=dtype)
    if arr.size and dtype.startswith("float") and draw(st.booleans()):
        arr.reshape(-1)[draw(st.integers(0, arr.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf, 1e4, -7]))
    if arr.size and dtype.startswith("int"):
        arr.reshape(-1)[:] = draw(st.integers(-10, 10))
    return arr


@st.composite
def _near_miss(draw, arr):
    """`arr` slightly wrong: another dtype, a NaN/Inf, a dim off by one, or a dim added/dropped."""
    how = draw(st.sampled_from(["dtype", "value", "dim", "rank"]))
    if how == "dtype":
        with np.errstate(all="ignore"):  # NaN -> int casts are part of the point
            return arr.astype(draw(st.sampled_from([d for d in DTYPES if d != "bfloat16"])))
    if how == "value" and arr.size:
        out = arr.astype(np.float32) if arr.dtype.kind != "f" else arr.copy()
        out.reshape(-1)[draw(st.integers(0, out.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf]))
        return out
    shape = list(arr.shape)
    if how == "dim" and shape:
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = max(0, shape[i] + draw(st.sampled_from([-1, 1])))
    elif how == "rank":
        shape = shape[:-1] if shape and draw(st.booleans()) else shape + [1]
    return np.zeros(shape, arr.dtype)


_OPS = (["near_miss"] * 6 + ["set_tensor"] * 2 + ["drop_tensor", "drop_meta", "set_meta"] * 2
        + ["add_scored"] * 3 + ["top", "replace_section"])


@st.composite
def _wrong_records(draw):
    """A valid record's wire map with a few random, well-formed (encodable) mutations."""
    scored = draw(st.booleans())
    # the current schema version, so the mutations reach meta/tensor validation (a wrong version is one op)
    obj = {"schema": SCHEMA_VERSION, "kind": "scored" if scored else "trajectory", "meta": dict(_VALID.meta),
           "tensors": {k: np.asarray(v) for k, v in _VALID.tensors.items()}}
    if scored:
        obj["meta"].update(log_reward=-1.5, reward_name="r")
        obj["tensors"].update(grad_final=np.zeros((2, 2), np.float32),
                              log_reward_x0=np.zeros(2, np.float32),
                              grad_x0=np.zeros((2, 2, 2), np.float32),
                              query_log_r=np.zeros(1, np.float32), query_grad=np.zeros((1, 2, 2), np.float32))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(_OPS))
        meta_ok, tensors_ok = isinstance(obj["meta"], dict), isinstance(obj["tensors"], dict)
        if op == "near_miss" and tensors_ok and obj["tensors"]:
            key = draw(st.sampled_from(sorted(obj["tensors"])))
            if isinstance(obj["tensors"][key], np.ndarray):
                obj["tensors"][key] = draw(_near_miss(obj["tensors"][key]))
        elif op == "drop_meta" and meta_ok and obj["meta"]:
            obj["meta"].pop(draw(st.sampled_from(sorted(obj["meta"]))), None)
        elif op == "set_meta" and meta_ok:
            key = draw(st.sampled_from(sorted(TRAJECTORY_META) + ["log_reward", "reward_name",
                                                                  "x"]))
            obj["meta"][key] = draw(_values)
        elif op == "drop_tensor" and tensors_ok and obj["tensors"]:
            obj["tensors"].pop(draw(st.sampled_from(sorted(obj["tensors"]))), None)
        elif op == "set_tensor" and tensors_ok:
            key = draw(st.sampled_from(sorted(SCORED_TENSORS) + ["zzz"]))
            obj["tensors"][key] = draw(st.one_of(_arrays(), _values))
        elif op == "top":
            obj[draw(st.sampled_from(["schema", "kind", "other"]))] = draw(_values)
        elif op == "replace_section":
            obj[draw(st.sampled_from(["meta", "tensors"]))] = draw(_values)
        elif op == "add_scored" and meta_ok and tensors_ok:
            obj["meta"].update(log_reward=draw(_scalars), reward_name="r")
            obj["tensors"]["grad_final"] = np.zeros((2, 2), np.float32)
    return obj


def test_the_unmutated_templates_are_valid():
    TrajectoryRecord.from_msg(_VALID_MSG)
    tensors = {**_VALID.tensors, "grad_final": np.zeros((2, 2), np.float32),
               "query_log_r": np.zeros(1, np.float32), "query_grad": np.zeros((1, 2, 2), np.float32)}
    ScoredRecord.from_msg(encode({"schema": SCHEMA_VERSION, "kind": "scored", "tensors": tensors,
                                  "meta": {**_VALID.meta, "log_reward": -1.5, "reward_name": "r"}}))


@SETTINGS
@given(_wrong_records())
def test_well_formed_but_wrong_records(obj):
    try:
        msg = encode(obj)
    except RecordError:
        return
    _only_record_errors(msg)
