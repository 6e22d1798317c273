"""Security properties of issue 6 (docs/reliability.md, "Security model"), each checked on the real code:

- no unsafe deserialisation or code evaluation anywhere in the package: an AST scan of every source
  file for pickle (and its kin), eval/exec/compile, torch.load without weights_only=True, unsafe
  yaml loaders and numpy's allow_pickle, failing with file:line;
- metrics endpoints bind 127.0.0.1 unless configured: the config default and the served socket;
- a Redis password never reaches the run dir or the console: config.yaml (`to_dict` redacts URL
  fields), summary.json, every other file the driver writes, stdout and stderr; checked both for a
  run that is refused (wrong password: exit 2) and for a real distributed run through an ACL user.
  (rediss:// and the redaction of errors and logs: tests/common/transport/test_connection.py.)
"""
import ast
import json
import urllib.request
from pathlib import Path
from urllib.parse import quote

import redis

from nablagfn.cli import main
from nablagfn.common.config import MetricsConfig, TrainConfig
from nablagfn.common.config_io import build_config, load_yaml, to_dict
from nablagfn.common.metrics import start_role_metrics

from test_driver import SMALL  # the tiny distributed run's settings (pytest puts tests/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("nablagfn", "actors", "common", "learner", "rewards_service")
SECRET = "s3cr%t:p@ss-7f3a"  # URL-quoted in the URL; neither form may appear anywhere


# -- no pickle, no eval ----------------------------------------------------------------------------
_BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
_BANNED_CALLS = {"eval", "exec", "compile", "__import__"}
_YAML_SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str:
    """`a.b.c` of a Name/Attribute chain ('' for anything else)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each unsafe construct in a parsed module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in _BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _BANNED_MODULES:
            out.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in _BANNED_CALLS:  # builtins only: model.eval() is an Attribute call, allowed
                out.append((node.lineno, f"{name}()"))
            elif name.split(".")[0] in _BANNED_MODULES:
                out.append((node.lineno, f"{name}()"))
            elif name.endswith("torch.load"):
                flag = _kw(node, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    out.append((node.lineno, "torch.load() without weights_only=True"))
            elif name in ("yaml.load", "yaml.load_all"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or _dotted(loader).rsplit(".", 1)[-1] not in _YAML_SAFE_LOADERS:
                    out.append((node.lineno, f"{name}() without a safe Loader"))
            elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
                out.append((node.lineno, f"{name}()"))
            elif last in ("load", "loads") and name.split(".")[0] in ("np", "numpy"):
                flag = _kw(node, "allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    out.append((node.lineno, f"{name}(allow_pickle=...)"))
            elif last in ("read_pickle", "to_pickle"):
                out.append((node.lineno, f"{name}()"))
    return sorted(out)


def test_the_scan_finds_what_it_looks_for():
    src = ("import pickle\nfrom dill import loads\nx = eval('1')\nexec('y=1')\nimport torch, yaml, numpy as np\n"
           "torch.load('f')\ntorch.load('f', weights_only=False)\nyaml.load(s)\nyaml.load(s, Loader=yaml.Loader)\n"
           "np.load('f', allow_pickle=True)\nmodel.eval()\ntorch.load('f', weights_only=True)\n"
           "yaml.load(s, Loader=yaml.SafeLoader)\nyaml.safe_load(s)\nnp.load('f')\n")
    lines = [line for line, _ in unsafe_uses(ast.parse(src))]
    assert lines == [1, 2, 3, 4, 6, 7, 8, 9, 10]  # lines 11-15 are the safe forms


def test_no_pickle_eval_or_unsafe_loaders_in_the_package():
    files = sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 50  # the scan sees the package
    found = [f"{p.relative_to(ROOT)}:{line}: {what}"
             for p in files for line, what in unsafe_uses(ast.parse(p.read_text(), str(p)))]
    assert not found, "unsafe constructs:\n" + "\n".join(found)


# -- metrics bind address --------------------------------------------------------------------------
def test_metrics_bind_loopback_unless_configured():
    assert MetricsConfig().bind_address == "127.0.0.1"
    assert TrainConfig().distributed.metrics.bind_address == "127.0.0.1"
    rm = start_role_metrics(MetricsConfig(port_range=(9400, 9599)), "reward", 0)
    try:
        host, port = rm._server.server_address[:2]
        assert host == "127.0.0.1"  # the listening socket itself, not just the advertised URL
        assert rm.url == f"http://127.0.0.1:{port}/metrics"
        body = urllib.request.urlopen(rm.url, timeout=5).read().decode()
        assert "nablagfn_dead_lettered_total" in body
    finally:
        rm.close()


# -- passwords never written -----------------------------------------------------------------------
def test_to_dict_redacts_url_passwords_and_keeps_the_rest():
    url = f"rediss://trainer:{quote(SECRET, safe='')}@redis.example:6380/0?ssl_ca_certs=/etc/ca.pem"
    cfg = build_config(TrainConfig, overrides=[f"distributed.redis.url={url}", "distributed.namespace=a_b"])
    out = to_dict(cfg)
    assert out["distributed"]["redis"]["url"] == "rediss://trainer:***@redis.example:6380/0?ssl_ca_certs=/etc/ca.pem"
    assert out["distributed"]["namespace"] == "a_b" and quote(SECRET, safe="") not in json.dumps(out)
    assert to_dict(cfg, secrets=True)["distributed"]["redis"]["url"] == url
    plain = "redis://redis.example:6379/2"
    assert to_dict(build_config(TrainConfig, overrides=[f"distributed.redis.url={plain}"]))["distributed"]["redis"]["url"] == plain


def _acl_user(server) -> str:
    """An ACL user `trainer` with SECRET on the embedded server; its unix:// URL."""
    raw = redis.Redis(unix_socket_path=server.socket)
    raw.execute_command("ACL", "SETUSER", "trainer", "on", f">{SECRET}", "~*", "&*", "+@all")
    raw.close()
    return f"unix://trainer:{quote(SECRET, safe='')}@{server.socket}"


def _assert_no_secret(run_dir: Path, *texts: str) -> int:
    """SECRET (plain or URL-quoted) in no file under run_dir and in none of `texts`; files checked."""
    needles = (SECRET.encode(), quote(SECRET, safe="").encode())
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    for p in files:
        data = p.read_bytes()
        assert not any(n in data for n in needles), p
    for t in texts:
        assert not any(n.decode() in t for n in needles)
    return len(files)


def test_refused_password_is_not_written_or_printed(tiny_dir, tmp_path, server, capsys):
    url = _acl_user(server).replace(quote(SECRET, safe=""), quote("wrong-" + SECRET, safe=""))
    run_dir = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", "--updates", "1", "--run-dir", str(run_dir), "--no-progress",
               f"model.pretrained={tiny_dir}", f"distributed.redis.url={url}", *SMALL])
    out, err = capsys.readouterr()
    assert rc == 2 and "refused the credentials" in err and "trainer:***@" in err
    assert "wrong-" not in err
    assert load_yaml(run_dir / "config.yaml")["distributed"]["redis"]["url"] == f"unix://trainer:***@{server.socket}"
    _assert_no_secret(run_dir, out, err)


def test_acl_password_run_writes_no_secret(tiny_dir, tmp_path, server, capsys, caplog):
    """A real distributed run (Ray, the tiny pipeline, 1 update) through an ACL user's URL."""
    url = _acl_user(server)
    run_dir = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", "--updates", "1", "--run-dir", str(run_dir), "--no-progress",
               f"model.pretrained={tiny_dir}", f"distributed.redis.url={url}", *SMALL])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] == 1 and summary["redis"] == f"unix://trainer:***@{server.socket}"
    assert load_yaml(run_dir / "config.yaml")["distributed"]["redis"]["url"] == f"unix://trainer:***@{server.socket}"
    assert _assert_no_secret(run_dir, out, err, caplog.text) >= 5
