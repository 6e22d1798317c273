"""The record schema that crosses the wire: what a sampled and a scored trajectory hold.

A record is `meta` (str/int/float/bool/list values) plus `tensors` (name -> numpy array or torch
tensor), sent as the msgpack map {"schema": SCHEMA_VERSION, "kind", "meta", "tensors"} through
`codec`. Validation runs on both ends (producers catch their bugs before sending, consumers
trust nothing) and names the failing field, e.g. "tensors.x_t: shape (3, 4, 8, 8), expected
(2, 4, 8, 8)", so the dead-letter stream says what was wrong.

Shapes, with N = meta.num_steps, K = kept transitions, S = the latent shape (= final.shape):
  timesteps (N,) int64 — the sampler's schedule;  step_idx (K,) int64 in [0, N)
  x_t, x_next, eps_behaviour (K, *S);  optional eps_pretrained, x0_pred (K, *S)
  optional states (N+1, *S) — the full latent path — or, with state_idx (M,) int64 (strictly
    increasing in [0, N]), states (M, *S): the states at those indices only (e.g. every state from
    the earliest kept step on, which the λ-return Stein target walks)
  final (*S);  optional cond_emb (L, D) — the prompt's text embedding
  optional flow queries (schema 2), all three together: query_state (Q,) int64 in [0, N],
    query_row (Q,) int64, query_x0 (Q, *S) — where the learner needs ∇log F̃ and the point the
    reward is taken at. row −1: the trajectory state query_state (< N: the terminal one is
    `final` itself, scored as grad_final), which the record must carry (in states, x_t or x_next);
    row k ≥ 0: the forward point fwd_point[k] (K, *S) of kept transition k, at state step_idx[k]+1.
  optional eps_idx (E,) int64 (strictly increasing in [0, N)) with eps_path (E, *S): the behaviour ε
    at more steps than the kept ones (the value term reads it at every step from the earliest kept)
Latents are float16/bfloat16/float32. A scored record adds meta log_reward (finite float) and
reward_name, tensors grad_final (*S) = ∇ log R(final), optional log_reward_x0 (K,) and
grad_x0 (K, *S) = ∇_{x̂₀} log R at the kept x̂₀, and query_log_r (Q,) and query_grad (Q, *S) =
log R and ∇_{x̂₀} log R at each query_x0 (required when the record has queries), all float32;
it may leave query_x0 out (the learner recomputes x̂₀(x) for the chain rule).

Schema history: 1 = the kept transitions; 2 = + state_idx, flow queries, fwd_point, query scores;
3 = + eps_idx / eps_path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from .codec import DEFAULT_MAX_BYTES, FLOAT_DTYPES, decode, dtype_name, encode, is_tensor
from .errors import RecordError

SCHEMA_VERSION = 3
LATENT_DTYPES = frozenset({"float16", "bfloat16", "float32"})
_INT64 = frozenset({"int64"})
_F32 = frozenset({"float32"})
_MAX_META_DEPTH = 4

Tensor = np.ndarray | torch.Tensor

# name -> (required, allowed dtypes, shape rule); rules: "N", "K", "M", "Q", "E", "K,S", "Q,S", "E,S", "S",
# "L,D", and "states" = (M, *S) with state_idx, else (N+1, *S)
TRAJECTORY_TENSORS: dict[str, tuple[bool, frozenset[str], str]] = {
    "timesteps": (True, _INT64, "N"),
    "step_idx": (True, _INT64, "K"),
    "x_t": (True, LATENT_DTYPES, "K,S"),
    "x_next": (True, LATENT_DTYPES, "K,S"),
    "eps_behaviour": (True, LATENT_DTYPES, "K,S"),
    "eps_pretrained": (False, LATENT_DTYPES, "K,S"),
    "x0_pred": (False, LATENT_DTYPES, "K,S"),
    "states": (False, LATENT_DTYPES, "states"),
    "state_idx": (False, _INT64, "M"),
    "final": (True, LATENT_DTYPES, "S"),
    "cond_emb": (False, LATENT_DTYPES, "L,D"),
    "query_state": (False, _INT64, "Q"),
    "query_row": (False, _INT64, "Q"),
    "query_x0": (False, LATENT_DTYPES, "Q,S"),
    "fwd_point": (False, LATENT_DTYPES, "K,S"),
    "eps_idx": (False, _INT64, "E"),
    "eps_path": (False, LATENT_DTYPES, "E,S"),
}
QUERY_TENSORS = ("query_state", "query_row", "query_x0")
SCORED_TENSORS: dict[str, tuple[bool, frozenset[str], str]] = {
    **TRAJECTORY_TENSORS,
    "grad_final": (True, _F32, "S"),
    "log_reward_x0": (False, _F32, "K"),
    "grad_x0": (False, _F32, "K,S"),
    "query_log_r": (False, _F32, "Q"),
    "query_grad": (False, _F32, "Q,S"),
}
QUERY_SCORES = ("query_log_r", "query_grad")
# name -> (python types, description); bool is excluded from int explicitly below
TRAJECTORY_META: dict[str, tuple[tuple[type, ...], str]] = {
    "run_id": ((str,), "str"), "traj_id": ((str,), "str"), "policy_version": ((int,), "int"),
    "prompt_id": ((int,), "int"), "prompt": ((str,), "str"), "sampler": ((str,), "str"),
    "num_steps": ((int,), "int"),
}
SCORED_META = {**TRAJECTORY_META, "reward_name": ((str,), "str"),
               "log_reward": ((float, int), "float")}


def _check_meta_value(value: Any, where: str, depth: int = 0) -> None:
    if isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RecordError(f"{where}: non-finite float {value}")
        return
    if isinstance(value, list) and depth < _MAX_META_DEPTH:
        for i, v in enumerate(value):
            _check_meta_value(v, f"{where}[{i}]", depth + 1)
        return
    raise RecordError(f"{where}: value of type {type(value).__name__} is not "
                      "str/int/float/bool/list")


def _check_meta(meta: Any, spec: dict[str, tuple[tuple[type, ...], str]]) -> None:
    if not isinstance(meta, dict):
        raise RecordError(f"meta: expected a map, got {type(meta).__name__}")
    for key, value in meta.items():
        if not isinstance(key, str):
            raise RecordError(f"meta: key {key!r} is not a string")
        _check_meta_value(value, f"meta.{key}")
    for key, (types, desc) in spec.items():
        if key not in meta:
            raise RecordError(f"meta.{key}: missing")
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise RecordError(f"meta.{key}: expected {desc}, got {type(value).__name__}")
    for key in ("run_id", "traj_id", "sampler"):
        if not meta[key]:
            raise RecordError(f"meta.{key}: must not be empty")
    if meta["num_steps"] < 1:
        raise RecordError(f"meta.num_steps: must be >= 1, got {meta['num_steps']}")
    if meta["policy_version"] < 0:
        raise RecordError(f"meta.policy_version: must be >= 0, got {meta['policy_version']}")


_EXPONENT_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}  # all ones: Inf or NaN


def _non_finite(t: Tensor) -> int:
    """Count of NaN/Inf values. Through numpy (torch's CPU elementwise kernels were measured ~100×
    slower on multi-MB records); 16-bit floats by their exponent bits."""
    name = dtype_name(t)
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().contiguous()
        t = t.view(torch.int16).numpy() if name in _EXPONENT_BITS else t.numpy()
    elif name == "float16":
        t = t.view(np.int16)
    if name in _EXPONENT_BITS:
        mask = _EXPONENT_BITS[name]
        return int(np.count_nonzero((t.view(np.uint16) & mask) == mask))
    return int(np.count_nonzero(~np.isfinite(t)))


def _check_tensors(tensors: Any, spec: dict[str, tuple[bool, frozenset[str], str]],
                   num_steps: int) -> None:
    if not isinstance(tensors, dict):
        raise RecordError(f"tensors: expected a map, got {type(tensors).__name__}")
    for name, (required, _, _) in spec.items():
        if required and name not in tensors:
            raise RecordError(f"tensors.{name}: missing")
    for name, t in tensors.items():
        if name not in spec:
            raise RecordError(f"tensors.{name!s}: unknown tensor (schema {SCHEMA_VERSION})")
        if not is_tensor(t):
            raise RecordError(f"tensors.{name}: expected a tensor, got {type(t).__name__}")
        allowed = spec[name][1]
        if dtype_name(t) not in allowed:
            raise RecordError(f"tensors.{name}: dtype {dtype_name(t)}, expected one of "
                              f"{sorted(allowed)}")
    S = tuple(tensors["final"].shape)
    if len(S) < 1:
        raise RecordError("tensors.final: must have rank >= 1 (the latent shape)")
    if len(tensors["step_idx"].shape) != 1 or tensors["step_idx"].shape[0] < 1:
        raise RecordError(f"tensors.step_idx: shape {tuple(tensors['step_idx'].shape)}, "
                          "expected (K,) with K >= 1")
    K = int(tensors["step_idx"].shape[0])
    _check_together(tensors, spec)
    M = _length(tensors, "state_idx")
    Q = _length(tensors, "query_state")
    E = _length(tensors, "eps_idx")
    for name, t in tensors.items():
        rule, shape = spec[name][2], tuple(t.shape)
        if rule == "L,D":
            if len(shape) != 2:
                raise RecordError(f"tensors.{name}: shape {shape}, expected rank 2 (L, D)")
            continue
        expected = {"N": (num_steps,), "K": (K,), "M": (M,), "Q": (Q,), "E": (E,), "S": S, "K,S": (K, *S),
                    "Q,S": (Q, *S), "E,S": (E, *S),
                    "states": (num_steps + 1 if M is None else M, *S)}[rule]
        if shape != expected:
            raise RecordError(f"tensors.{name}: shape {shape}, expected {expected}")
    for name, t in tensors.items():
        if dtype_name(t) in FLOAT_DTYPES and (bad := _non_finite(t)):
            raise RecordError(f"tensors.{name}: {bad} non-finite values (NaN/Inf)")
    idx = tensors["step_idx"]
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= num_steps:
        raise RecordError(f"tensors.step_idx: values in [{lo}, {hi}], expected [0, {num_steps})")
    if M is not None:
        _check_state_idx(tensors["state_idx"], num_steps)
    if E is not None:
        _check_state_idx(tensors["eps_idx"], num_steps - 1, "eps_idx")
    if Q is not None:
        _check_queries(tensors, num_steps)


def _as_list(t: Tensor) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else np.asarray(t).tolist())]


def _length(tensors: dict, name: str) -> int | None:
    """The length of the 1-d index tensor `name`, None when absent."""
    if name not in tensors:
        return None
    shape = tuple(tensors[name].shape)
    if len(shape) != 1:
        raise RecordError(f"tensors.{name}: shape {shape}, expected rank 1")
    return shape[0]


def _check_together(tensors: dict, spec: dict) -> None:
    """Tensors that only make sense together: states with state_idx, the query triple, and
    (scored records) the query scores with the queries."""
    if "state_idx" in tensors and "states" not in tensors:
        raise RecordError("tensors.states: missing (state_idx names the states it holds)")
    for a, b in (("eps_idx", "eps_path"), ("eps_path", "eps_idx")):
        if a in tensors and b not in tensors:
            raise RecordError(f"tensors.{b}: missing (it comes with {a})")
    scored = all(n in spec for n in QUERY_SCORES)
    # a scored record may drop query_x0: the learner recomputes x̂₀(x) to chain the gradient
    together = QUERY_TENSORS[:2] if scored else QUERY_TENSORS
    have = [n for n in QUERY_TENSORS if n in tensors]
    if have and not all(n in tensors for n in together):
        missing = next(n for n in together if n not in tensors)
        raise RecordError(f"tensors.{missing}: missing (queries need {', '.join(together)})")
    if scored:
        for n in QUERY_SCORES:
            if have and n not in tensors:
                raise RecordError(f"tensors.{n}: missing (the record has flow queries)")
            if not have and n in tensors:
                raise RecordError(f"tensors.{n}: present without flow queries")


def _check_state_idx(state_idx: Tensor, top: int, name: str = "state_idx") -> None:
    idx = _as_list(state_idx)
    if idx and (min(idx) < 0 or max(idx) > top):
        raise RecordError(f"tensors.{name}: values in [{min(idx)}, {max(idx)}], expected [0, {top}]")
    if any(b <= a for a, b in zip(idx, idx[1:])):
        raise RecordError(f"tensors.{name}: must be strictly increasing")


def carried_eps(tensors: dict) -> set[int]:
    """Steps whose behaviour ε a record holds: step_idx (eps_behaviour) and eps_idx (eps_path)."""
    out = set(_as_list(tensors["step_idx"]))
    if "eps_idx" in tensors:
        out |= set(_as_list(tensors["eps_idx"]))
    return out


def carried_states(tensors: dict, num_steps: int) -> set[int]:
    """Indices of the trajectory states a record holds: states (all N+1, or state_idx), the kept
    x_t (step_idx) and x_next (step_idx + 1), and final (N)."""
    steps = _as_list(tensors["step_idx"])
    out = set(steps) | {s + 1 for s in steps} | {num_steps}
    if "states" in tensors:
        out |= (set(_as_list(tensors["state_idx"])) if "state_idx" in tensors
                else set(range(num_steps + 1)))
    return out


def _check_queries(tensors: dict, num_steps: int) -> None:
    states, rows = _as_list(tensors["query_state"]), _as_list(tensors["query_row"])
    steps = _as_list(tensors["step_idx"])
    K = len(steps)
    carried = carried_states(tensors, num_steps)
    seen_states, seen_rows = set(), set()
    for q, (s, r) in enumerate(zip(states, rows)):
        if not 0 <= s <= num_steps:
            raise RecordError(f"tensors.query_state[{q}]: {s}, expected [0, {num_steps}]")
        if r == -1:
            if s == num_steps:
                raise RecordError(f"tensors.query_state[{q}]: the terminal state {s} is `final` "
                                  "(scored as grad_final), not a query")
            if s not in carried:
                raise RecordError(f"tensors.query_state[{q}]: state {s} is not carried by "
                                  "states, x_t or x_next")
            if s in seen_states:
                raise RecordError(f"tensors.query_state[{q}]: state {s} queried twice")
            seen_states.add(s)
        elif 0 <= r < K:
            if "fwd_point" not in tensors:
                raise RecordError(f"tensors.query_row[{q}]: row {r} needs tensors.fwd_point")
            if s != steps[r] + 1:
                raise RecordError(f"tensors.query_state[{q}]: {s}, expected step_idx[{r}] + 1 = "
                                  f"{steps[r] + 1} for forward-point row {r}")
            if r in seen_rows:
                raise RecordError(f"tensors.query_row[{q}]: row {r} queried twice")
            seen_rows.add(r)
        else:
            raise RecordError(f"tensors.query_row[{q}]: {r}, expected -1 or [0, {K})")


def check_model_shapes(rec: "TrajectoryRecord", latent_shape: tuple[int, ...],
                       cond_shape: tuple[int, int] | None = None) -> None:
    """Raise RecordError unless `rec` fits the consumer's model: latents of shape `latent_shape`
    (C, H, W) and, given `cond_shape`, a cond_emb of that (L, D). `validate` only proves a record
    self-consistent; a consistent record of another resolution or text encoder would otherwise
    crash a reward batch (torch.cat of mixed shapes) or the learner's update instead of being
    dead-lettered. Call it on every decoded record before batching."""
    t = rec.tensors
    shape = tuple(t["final"].shape)
    if shape != tuple(latent_shape):
        raise RecordError(f"tensors.final: shape {shape}, expected the model's latent shape {tuple(latent_shape)}")
    if cond_shape is not None and "cond_emb" in t and tuple(t["cond_emb"].shape) != tuple(cond_shape):
        raise RecordError(f"tensors.cond_emb: shape {tuple(t['cond_emb'].shape)}, expected the text "
                          f"encoder's {tuple(cond_shape)}")


@dataclass
class TrajectoryRecord:
    """One sampled trajectory's kept transitions (see the module docstring for the fields)."""

    meta: dict[str, Any]
    tensors: dict[str, Tensor] = field(default_factory=dict)

    KIND: ClassVar[str] = "trajectory"
    META: ClassVar[dict] = TRAJECTORY_META
    TENSORS: ClassVar[dict] = TRAJECTORY_TENSORS

    @property
    def traj_id(self) -> str:
        return self.meta["traj_id"]

    @property
    def policy_version(self) -> int:
        return self.meta["policy_version"]

    @property
    def num_kept(self) -> int:
        return int(self.tensors["step_idx"].shape[0])

    def validate(self) -> None:
        """Raise RecordError naming the first bad field; return None when the record is valid."""
        _check_meta(self.meta, self.META)
        _check_tensors(self.tensors, self.TENSORS, self.meta["num_steps"])

    def to_msg(self, max_bytes: int | None = None, validate: bool = True) -> bytes:
        """msgpack bytes; validated first, so a producer never sends what consumers reject."""
        if validate:
            self.validate()
        return encode({"schema": SCHEMA_VERSION, "kind": self.KIND, "meta": self.meta,
                       "tensors": self.tensors}, max_bytes)

    @classmethod
    def from_msg(cls, data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, *,
                 as_torch: bool = True):
        """Decode and validate; raises RecordError (only) for anything wrong."""
        obj = decode(data, max_bytes, as_torch=as_torch)
        if not isinstance(obj, dict):
            raise RecordError(f"record: expected a map, got {type(obj).__name__}")
        extra = set(obj) - {"schema", "kind", "meta", "tensors"}
        if extra:
            raise RecordError(f"record: unknown top-level keys {sorted(map(str, extra))}")
        version = obj.get("schema")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise RecordError(f"schema: version {version!r}, expected {SCHEMA_VERSION}")
        if obj.get("kind") != cls.KIND:
            raise RecordError(f"kind: {obj.get('kind')!r}, expected {cls.KIND!r}")
        record = cls(meta=obj.get("meta"), tensors=obj.get("tensors"))
        record.validate()
        return record


@dataclass
class ScoredRecord(TrajectoryRecord):
    """A trajectory plus its reward: meta log_reward/reward_name, tensors grad_final etc."""

    KIND: ClassVar[str] = "scored"
    META: ClassVar[dict] = SCORED_META
    TENSORS: ClassVar[dict] = SCORED_TENSORS

    @property
    def log_reward(self) -> float:
        return float(self.meta["log_reward"])

    @classmethod
    def from_trajectory(cls, traj: TrajectoryRecord, *, log_reward: float, grad_final: Tensor,
                        reward_name: str, log_reward_x0: Tensor | None = None,
                        grad_x0: Tensor | None = None, query_log_r: Tensor | None = None,
                        query_grad: Tensor | None = None) -> "ScoredRecord":
        """The reward worker's output: the trajectory's fields (shared, not copied) + reward."""
        meta = {**traj.meta, "log_reward": float(log_reward), "reward_name": reward_name}
        tensors = {**traj.tensors, "grad_final": grad_final}
        for name, value in (("log_reward_x0", log_reward_x0), ("grad_x0", grad_x0),
                            ("query_log_r", query_log_r), ("query_grad", query_grad)):
            if value is not None:
                tensors[name] = value
        return cls(meta=meta, tensors=tensors)
