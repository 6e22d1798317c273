"""deploy/ files validate against the code: the Grafana dashboard loads and every panel's PromQL names
only metrics the code exports (common/metrics/definitions.py), and every exported metric is on some
panel; the provisioning files point at the dashboard's datasource uid and folder; prometheus.yml
reads the driver's file-SD target file; the Ray cluster YAML and the KubeRay manifests parse and
their node types / worker groups advertise exactly the custom resources the driver requests for
deploy/run-config.yaml (driver.role_options), each role on its own node type with its own min/max."""
import json
import re
from pathlib import Path

import yaml

from nablagfn.common.config import TrainConfig
from nablagfn.common.config_io import build_config
from nablagfn.common.metrics import METRICS, TARGETS_FILE, exported_names, full_name
from nablagfn.driver import ROLES, role_options

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC_RE = re.compile(r"\bnablagfn_[a-z0-9_]+")


def panel_exprs(dash: dict) -> list[tuple[str, str]]:
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def requested() -> dict[str, dict]:
    """role -> the custom resources the driver requests for deploy/run-config.yaml."""
    cfg = build_config(TrainConfig, yaml.safe_load((DEPLOY / "run-config.yaml").read_text()))
    return {role: role_options(getattr(cfg.distributed, role)).get("resources", {}) for role in ROLES}


def test_run_config_requests_one_custom_resource_per_role():
    req = requested()
    assert req == {"sampler": {"sampler": 1}, "reward": {"reward": 1}, "learner": {"learner": 1}}, req


def test_dashboard_queries_name_exported_metrics():
    dash = json.loads((DEPLOY / "grafana/dashboards/nablagfn.json").read_text())
    exported = exported_names()
    exprs = panel_exprs(dash)
    assert len(exprs) >= 20
    used = set()
    for title, expr in exprs:
        names = set(METRIC_RE.findall(expr))
        assert names, f"panel {title!r}: no nablagfn metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"panel {title!r}: {sorted(unknown)} are not exported by common/metrics"
        used |= names
    for var in dash["templating"]["list"]:
        assert set(METRIC_RE.findall(var["definition"])) <= exported, var["name"]
    # every defined metric is on the dashboard (as itself or one of its histogram/counter series)
    for name in METRICS:
        full = full_name(name)
        assert any(u == full or u.startswith(full.removesuffix("_total") + "_") for u in used), name
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    # the datasource uid is the provisioned one
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = ds["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in dash["panels"] if p["type"] != "row")
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/nablagfn.yaml").read_text())
    assert prov["providers"][0]["type"] == "file" and prov["providers"][0]["options"]["path"]


def test_prometheus_reads_the_driver_target_file():
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "nablagfn")
    files = [f for sd in job["file_sd_configs"] for f in sd["files"]]
    assert any(f.endswith("/" + TARGETS_FILE) for f in files), files


def test_ray_cluster_yaml_offers_each_role_on_its_own_node_type():
    cluster = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    for role, res in requested().items():
        (name, offering), = [(n, t) for n, t in types.items() if set(res) & set(t.get("resources", {}))]
        for key, amount in res.items():
            assert offering["resources"][key] >= amount, (role, name)
        assert offering["resources"].get("GPU", 0) >= 1, name
        assert 0 <= offering["min_workers"] <= offering["max_workers"], name
    head = types[cluster["head_node_type"]]["resources"]
    assert not set(head) & {"sampler", "reward", "learner"}  # no actor on the head


def test_kuberay_manifests_offer_the_same_roles():
    req = requested()
    for fname, kind in (("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")):
        docs = [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / fname).read_text()) if d]
        (ray_doc,) = [d for d in docs if d["kind"] == kind]
        spec = ray_doc["spec"] if kind == "RayCluster" else ray_doc["spec"]["rayClusterSpec"]
        offered = {}
        for g in spec["workerGroupSpecs"]:
            res = json.loads(json.loads(g["rayStartParams"]["resources"]))  # '"{\"sampler\": 1}"'
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, g["groupName"]
            for k in res:
                assert k not in offered, f"{fname}: {k} offered by two groups"
                offered[k] = res[k]
        for role, res in req.items():
            for key, amount in res.items():
                assert offered.get(key, 0) >= amount, (fname, role, key)
        assert {d["kind"] for d in docs} >= {"Deployment", "Service"}  # the run's Redis
        if kind == "RayJob":
            entry = ray_doc["spec"]["entrypoint"]
            assert "nablagfn train" in entry and "deploy/run-config.yaml" in entry and "nablagfn-redis" in entry
