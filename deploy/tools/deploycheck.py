#!/usr/bin/env python3
"""Checks and generators for outbox-relay's deployment files.

Driven by .ci/validate-deploy; each subcommand prints what it checked and
exits non-zero on a failure. Needs PyYAML; `k8s-validate` also needs
kubernetes-validate (both installed by .ci/validate-deploy under .tools/).

  deploycheck.py prometheusrule (--write | --check)
  deploycheck.py strip-annotations SRC DST
  deploycheck.py metrics
  deploycheck.py dashboard-promql DST
  deploycheck.py dashboard
  deploycheck.py config-keys
  deploycheck.py kustomize DIR [OUT]          (the fallback renderer)
  deploycheck.py kustomize-compare A B
  deploycheck.py k8s-validate RENDERED... 
  deploycheck.py k8s-policy SIDECAR STANDALONE
  deploycheck.py runtime-libs BINARY
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "outbox-relay-rules.yml"
PROMETHEUSRULE = DEPLOY / "kubernetes" / "base" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "outbox-relay-dashboard.json"
METRICS = DEPLOY / "metrics.txt"
SLIM_PACKAGES = DEPLOY / "docker" / "debian-bookworm-slim.packages"
DOCKERFILE = ROOT / "Dockerfile"
UNIT = DEPLOY / "systemd" / "outbox-relay.service"

# Kinds kubernetes-validate has no schema for (custom resources of the
# Prometheus Operator); checked structurally by k8s-policy instead.
CRD_KINDS = {"PodMonitor", "PrometheusRule"}
# Kubernetes versions the manifests are validated against: the oldest still
# common in managed clusters and the newest the validator bundles.
K8S_VERSIONS = ["1.28.0", "latest"]

RELAY_CONTAINER = "outbox-relay"
DRAIN_TIMEOUT_S = 30
FAILED = []


def ok(msg):
    print(f"  ok    {msg}")


def fail(msg):
    print(f"  FAIL  {msg}")
    FAILED.append(msg)


def note(msg):
    print(f"  note  {msg}")


def finish():
    sys.exit(1 if FAILED else 0)


def rel(p):
    """A path relative to the repository; a rendered overlay by its name."""
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return f"{Path(p).stem} (rendered)"


# ---------------------------------------------------------------------------
# PrometheusRule generated from the rules file
# ---------------------------------------------------------------------------

PR_HEADER = """\
# GENERATED from deploy/prometheus/outbox-relay-rules.yml by
# `.ci/validate-deploy --regenerate`. Do not edit: edit the rules file and
# regenerate; .ci/validate-deploy fails while the two differ.
# Add the labels your Prometheus' ruleSelector needs (kube-prometheus-stack:
# `release: <helm release>`) in your overlay.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: outbox-relay
  labels:
    app.kubernetes.io/name: outbox-relay
    app.kubernetes.io/part-of: outbox-relay
spec:
"""


def render_prometheusrule():
    lines = RULES.read_text().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith("groups:")), None)
    if start is None:
        raise SystemExit(f"{rel(RULES)}: no top-level 'groups:' line")
    body = "".join(("  " + l if l.strip() else "") + "\n" for l in lines[start:])
    return PR_HEADER + body


def cmd_prometheusrule(args):
    text = render_prometheusrule()
    if args and args[0] == "--write":
        PROMETHEUSRULE.write_text(text)
        ok(f"wrote {rel(PROMETHEUSRULE)} from {rel(RULES)}")
        return finish()
    if not PROMETHEUSRULE.exists():
        fail(f"{rel(PROMETHEUSRULE)} is missing: run .ci/validate-deploy --regenerate")
        return finish()
    current = PROMETHEUSRULE.read_text()
    rules = yaml.safe_load(RULES.read_text())
    pr = yaml.safe_load(current)
    if pr.get("spec") != rules:
        fail(f"{rel(PROMETHEUSRULE)} spec differs from {rel(RULES)}: run .ci/validate-deploy --regenerate")
    elif current != text:
        fail(f"{rel(PROMETHEUSRULE)} has the same rules but is not the generated text: run .ci/validate-deploy --regenerate")
    else:
        n = sum(len(g["rules"]) for g in rules["groups"])
        ok(f"PrometheusRule spec is identical to the rules file ({n} rules)")
    finish()


def cmd_strip_annotations(args):
    src, dst = args
    doc = yaml.safe_load(Path(src).read_text())
    for g in doc["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    Path(dst).write_text(yaml.safe_dump(doc, sort_keys=False))


# ---------------------------------------------------------------------------
# Metric names
# ---------------------------------------------------------------------------

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_RE = re.compile(r"\boutbox_relay_[a-zA-Z0-9_]+")


def known_metrics():
    names = [l.strip() for l in METRICS.read_text().splitlines() if l.strip()]
    bad = [n for n in names if not re.fullmatch(r"outbox_relay_[a-z0-9_]+", n)]
    if bad:
        fail(f"{rel(METRICS)}: not metric names: {bad}")
    if len(set(names)) != len(names):
        fail(f"{rel(METRICS)}: duplicate names")
    return set(names)


def rule_exprs():
    doc = yaml.safe_load(RULES.read_text())
    for g in doc["groups"]:
        for r in g["rules"]:
            yield r.get("alert") or r.get("record"), r["expr"]


def dashboard_exprs(dash=None):
    dash = dash or json.loads(DASHBOARD.read_text())
    for p in all_panels(dash):
        for t in p.get("targets", []):
            if "expr" in t:
                yield p.get("title", "?"), t["expr"]
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and isinstance(q, str):
            yield f"variable {v.get('name')}", q


def all_panels(dash):
    for p in dash.get("panels", []):
        yield p
        for q in p.get("panels", []):  # collapsed rows
            yield q


def resolve_metric(name, known):
    if name in known:
        return name
    for s in HISTOGRAM_SUFFIXES:
        if name.endswith(s) and name[: -len(s)] in known:
            return name[: -len(s)]
    return None


def cmd_metrics(args):
    known = known_metrics()
    used = set()
    for source, exprs in (("alert rules", rule_exprs()), ("dashboard", dashboard_exprs())):
        unknown = []
        count = 0
        for where, expr in exprs:
            for m in METRIC_RE.findall(expr):
                count += 1
                base = resolve_metric(m, known)
                if base is None:
                    unknown.append(f"{m} (in {where})")
                else:
                    used.add(base)
        if unknown:
            fail(f"{source}: metric names not in {rel(METRICS)}: " + ", ".join(sorted(set(unknown))))
        else:
            ok(f"{source}: all {count} metric references are in {rel(METRICS)}")
    unused = sorted(known - used)
    if unused:
        note(f"listed but used by neither rules nor dashboard: {', '.join(unused)}")
    finish()


# ---------------------------------------------------------------------------
# Grafana dashboard
# ---------------------------------------------------------------------------

GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
}


def promql_for_promtool(expr):
    """Replaces Grafana variables so that promtool can parse the query."""
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    expr = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(:[a-z]+)?\}?", ".+", expr)
    return expr


def cmd_dashboard_promql(args):
    """Writes the dashboard's queries as recording rules, for promtool."""
    rules = []
    for i, (where, expr) in enumerate(dashboard_exprs()):
        if where.startswith("variable "):
            # label_values(metric, label) is Grafana's, not PromQL
            m = re.fullmatch(r"\s*label_values\(\s*([^,]+?)\s*,\s*\w+\s*\)\s*", expr)
            expr = m.group(1) if m else expr
        rules.append({"record": f"dashboard:query_{i}", "expr": promql_for_promtool(expr)})
    Path(args[0]).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))


def cmd_dashboard(args):
    try:
        dash = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        fail(f"{rel(DASHBOARD)}: invalid JSON: {e}")
        return finish()
    ok(f"{rel(DASHBOARD)} is valid JSON")
    sv = dash.get("schemaVersion")
    if not isinstance(sv, int) or sv < 36:
        fail(f"schemaVersion {sv!r}: expected a current schema (>= 36)")
    ds_vars = [v for v in dash.get("templating", {}).get("list", []) if v.get("name") == "DS_PROMETHEUS"]
    if not ds_vars or ds_vars[0].get("type") != "datasource" or ds_vars[0].get("query") != "prometheus":
        fail("templating needs a datasource variable DS_PROMETHEUS of type prometheus")
    ids = []
    boxes = []
    for p in all_panels(dash):
        ids.append(p.get("id"))
        title = p.get("title", f"id {p.get('id')}")
        if p.get("type") == "row":
            continue
        ds = p.get("datasource") or {}
        if ds.get("uid") != "${DS_PROMETHEUS}":
            fail(f"panel {title!r}: datasource uid is {ds.get('uid')!r}, expected ${{DS_PROMETHEUS}}")
        targets = p.get("targets") or []
        if not targets:
            fail(f"panel {title!r}: no queries")
        for t in targets:
            if (t.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
                fail(f"panel {title!r}: a query's datasource is not ${{DS_PROMETHEUS}}")
            if not t.get("expr"):
                fail(f"panel {title!r}: a query has no expr")
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in "xywh") or g["x"] + g["w"] > 24:
            fail(f"panel {title!r}: bad gridPos {g}")
        else:
            boxes.append((title, g))
    if len(ids) != len(set(ids)) or None in ids:
        fail("panel ids must be present and unique")
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1 :]:
            if a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]:
                fail(f"panels {ta!r} and {tb!r} overlap")
    if not FAILED:
        ok(f"dashboard structure: {len(boxes)} panels, unique ids, no overlaps, every query on ${{DS_PROMETHEUS}}")
    finish()


# ---------------------------------------------------------------------------
# Configuration keys used by the deployment files
# ---------------------------------------------------------------------------

# Keys the relay accepts that the reference config/outbox-relay.toml may not
# show yet. Maps (free-form librdkafka properties) end in ".*".
EXTRA_KEYS = {
    "postgres.password_file",
    "http.listen",
    "sink.kafka.properties.*",
    "sink.kafka.properties_from_files.*",
}
MAP_TABLES = ("sink.kafka.properties", "sink.kafka.properties_from_files")


def flatten(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if key in MAP_TABLES:
            yield f"{key}.*"
        elif isinstance(v, dict):
            if not v:
                yield key + ".*" if key in MAP_TABLES else key
            yield from flatten(v, key + ".")
        else:
            yield key


def allowed_keys():
    ref = tomllib.loads((ROOT / "config" / "outbox-relay.toml").read_text())
    keys = set(flatten(ref)) | EXTRA_KEYS
    # tables themselves (e.g. "sink.kafka") are allowed as prefixes
    return keys


def env_key(name):
    """OUTBOX_RELAY_SINK__KAFKA__BROKERS -> sink.kafka.brokers"""
    return ".".join(part.lower() for part in name[len("OUTBOX_RELAY_") :].split("__"))


def cmd_config_keys(args):
    allowed = allowed_keys()
    tomls = sorted(DEPLOY.rglob("*.toml"))
    for path in tomls:
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            fail(f"{rel(path)}: invalid TOML: {e}")
            continue
        bad = sorted(k for k in flatten(data) if k not in allowed)
        if bad:
            fail(f"{rel(path)}: unknown keys {bad}")
        else:
            ok(f"{rel(path)}: valid TOML, all keys known")
    env_re = re.compile(r"\bOUTBOX_RELAY_[A-Z0-9_]+")
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".service", ".env", "")]
    files += [DOCKERFILE]
    seen = 0
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for name in set(env_re.findall(text)):
            if name == "OUTBOX_RELAY_CONFIG" or name.endswith("_"):
                continue
            seen += 1
            if env_key(name) not in allowed:
                fail(f"{rel(path)}: {name} maps to unknown key {env_key(name)}")
    ok(f"{seen} OUTBOX_RELAY_* environment variable uses map to known keys")
    finish()


# ---------------------------------------------------------------------------
# A small kustomize: the subset these overlays use. Used when neither
# kustomize nor kubectl is available; compared with kubectl's output when it
# is, so that it cannot silently diverge.
# ---------------------------------------------------------------------------

MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
SUPPORTED_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "images"}


def smp(dst, patch, key=None):
    """Strategic merge of `patch` into `dst` (dicts merge, lists with a merge key merge by it)."""
    if isinstance(dst, dict) and isinstance(patch, dict):
        out = dict(dst)
        for k, v in patch.items():
            out[k] = smp(dst[k], v, k) if k in dst else v
        return out
    if isinstance(dst, list) and isinstance(patch, list) and key in MERGE_KEYS:
        mk = MERGE_KEYS[key]
        out = list(dst)
        new = []
        for item in patch:
            idx = next((i for i, d in enumerate(out) if d.get(mk) == item.get(mk)), None)
            if idx is None:
                new.append(item)
            else:
                out[idx] = smp(out[idx], item)
        # kustomize puts the patch's new items before the existing ones
        return new + out
    return patch


def go_json(obj):
    """json.Marshal as Go does it for maps of strings: sorted keys, HTML-escaped."""
    s = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def configmap_hash(cm):
    # As kustomize's hasher computes it. Its lookup of "metadata/name" finds
    # nothing, so the name it hashes is "" (checked against kubectl's output).
    enc = go_json({"kind": "ConfigMap", "name": "", "data": cm.get("data", {})})
    h = list(hashlib.sha256(enc.encode()).hexdigest()[:10])
    swap = {"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}
    return "".join(swap.get(c, c) for c in h)


def pod_spec(doc):
    kind = doc.get("kind")
    spec = doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return spec.get("template", {}).get("spec")
    if kind == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    if kind == "Pod":
        return spec
    return None


def image_name(image):
    """registry/repo:tag@digest -> registry/repo"""
    image = image.split("@", 1)[0]
    head, _, last = image.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def kustomize_accumulate(d):
    d = Path(d)
    kpath = d / "kustomization.yaml"
    k = yaml.safe_load(kpath.read_text())
    unsupported = set(k) - SUPPORTED_KUSTOMIZATION_FIELDS
    if unsupported:
        raise SystemExit(f"{rel(kpath)}: fallback renderer does not support {sorted(unsupported)}")
    docs = []
    for r in k.get("resources", []):
        p = d / r
        if p.is_dir():
            docs += kustomize_accumulate(p)
        else:
            docs += [x for x in yaml.safe_load_all(p.read_text()) if x]
    for g in k.get("configMapGenerator", []):
        if g.get("behavior", "create") != "create" or set(g) - {"name", "files", "options", "behavior"}:
            raise SystemExit(f"{rel(kpath)}: fallback renderer supports configMapGenerator with files only")
        data = {}
        for f in g.get("files", []):
            key, path = f.split("=", 1) if "=" in f else (Path(f).name, f)
            data[key] = (d / path).read_text()
        meta = {"name": g["name"]}
        labels = (g.get("options") or {}).get("labels")
        if labels:
            meta["labels"] = dict(labels)
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data, "__generated": True})
    for p in k.get("patches", []):
        if set(p) != {"path"}:
            raise SystemExit(f"{rel(kpath)}: fallback renderer supports `patches: - path:` only")
        patch = yaml.safe_load((d / p["path"]).read_text())
        targets = [x for x in docs if x.get("kind") == patch["kind"] and x["metadata"]["name"] == patch["metadata"]["name"]]
        if len(targets) != 1:
            raise SystemExit(f"{rel(d / p['path'])}: patch target {patch['kind']}/{patch['metadata']['name']} not found")
        i = docs.index(targets[0])
        docs[i] = smp(targets[0], patch)
    for img in k.get("images", []):
        for doc in docs:
            ps = pod_spec(doc)
            if not ps:
                continue
            for c in ps.get("containers", []) + ps.get("initContainers", []):
                if image_name(c["image"]) == img["name"]:
                    tag = img.get("newTag")
                    c["image"] = img.get("newName", img["name"]) + (f":{tag}" if tag else "")
    return docs


KIND_ORDER = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
    "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
    "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
]


def kustomize_build(d):
    docs = kustomize_accumulate(d)
    renames = {}
    for doc in docs:
        if doc.pop("__generated", False):
            old = doc["metadata"]["name"]
            doc["metadata"]["name"] = f"{old}-{configmap_hash(doc)}"
            renames[old] = doc["metadata"]["name"]
    for doc in docs:
        ps = pod_spec(doc)
        if not ps:
            continue
        for v in ps.get("volumes", []):
            cm = v.get("configMap")
            if cm and cm.get("name") in renames:
                cm["name"] = renames[cm["name"]]
        for c in ps.get("containers", []) + ps.get("initContainers", []):
            for e in c.get("envFrom", []):
                ref = e.get("configMapRef")
                if ref and ref.get("name") in renames:
                    ref["name"] = renames[ref["name"]]
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                if ref and ref.get("name") in renames:
                    ref["name"] = renames[ref["name"]]

    def order(doc):
        kind = doc.get("kind")
        return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind, doc["metadata"]["name"])

    return sorted(docs, key=order)


def cmd_kustomize(args):
    docs = kustomize_build(args[0])
    text = yaml.safe_dump_all(docs, sort_keys=True)
    if len(args) > 1:
        Path(args[1]).write_text(text)
    else:
        sys.stdout.write(text)


def load_docs(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def keyed(docs):
    return {(d.get("kind"), d["metadata"].get("name")): d for d in docs}


def cmd_kustomize_compare(args):
    a, b = (keyed(load_docs(p)) for p in args)
    if a == b:
        ok(f"fallback renderer output equals kubectl kustomize output ({len(a)} objects)")
    else:
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                fail(f"fallback renderer differs from kubectl kustomize on {k[0]}/{k[1]}")
    finish()


# ---------------------------------------------------------------------------
# Kubernetes validation
# ---------------------------------------------------------------------------

def cmd_k8s_validate(args):
    import kubernetes_validate

    latest = kubernetes_validate.latest_version()
    for path in args:
        docs = load_docs(path)
        name = rel(path)
        for d in docs:
            ident = f"{d.get('kind')}/{d['metadata'].get('name')}"
            if d.get("kind") in CRD_KINDS:
                note(f"{name}: {ident}: skipped: custom resource ({d.get('apiVersion')}), no schema in kubernetes-validate; checked structurally by k8s-policy")
                continue
            for v in K8S_VERSIONS:
                version = latest if v == "latest" else v
                try:
                    kubernetes_validate.validate(d, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    fail(f"{name}: {ident} invalid for Kubernetes {version}: {e.message} at {'.'.join(map(str, e.path))}")
                except Exception as e:  # schema missing etc.
                    fail(f"{name}: {ident}: cannot validate for Kubernetes {version}: {e}")
            ok(f"{name}: {ident} valid (strict) for Kubernetes {', '.join(latest if v == 'latest' else v for v in K8S_VERSIONS)}")
    finish()


def relay_pods(docs):
    for d in docs:
        ps = pod_spec(d)
        if ps and any(c["name"] == RELAY_CONTAINER for c in ps.get("containers", [])):
            yield d, ps


def check_relay_pod(name, d, ps, docs):
    ident = f"{name}: {d['kind']}/{d['metadata']['name']}"
    c = next(c for c in ps["containers"] if c["name"] == RELAY_CONTAINER)
    problems = []
    sc = c.get("securityContext", {})
    want = {"runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}
    for k, v in want.items():
        if sc.get(k) != v:
            problems.append(f"securityContext.{k} should be {v}")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("securityContext.capabilities.drop should be [ALL]")
    seccomp = sc.get("seccompProfile") or (ps.get("securityContext") or {}).get("seccompProfile") or {}
    if seccomp.get("type") != "RuntimeDefault":
        problems.append("seccompProfile should be RuntimeDefault")
    res = c.get("resources", {})
    if not res.get("requests") or not res.get("limits", {}).get("memory"):
        problems.append("resources need requests and a memory limit")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
    if ports.get("metrics") != 9187:
        problems.append("needs container port `metrics` = 9187")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        hg = (c.get(probe) or {}).get("httpGet") or {}
        if hg.get("path") != path or hg.get("port") not in ("metrics", 9187):
            problems.append(f"{probe} should GET {path} on port metrics")
    grace = ps.get("terminationGracePeriodSeconds", 30)
    if grace < DRAIN_TIMEOUT_S + 10:
        problems.append(f"terminationGracePeriodSeconds {grace} does not cover the {DRAIN_TIMEOUT_S}s drain plus a margin")
    labels = d["spec"]["template"]["metadata"].get("labels", {})
    monitors = [m for m in docs if m.get("kind") == "PodMonitor"]
    if not any(all(labels.get(k) == v for k, v in m["spec"]["selector"]["matchLabels"].items()) for m in monitors):
        problems.append("no PodMonitor selects this pod template")
    volumes = {v["name"]: v for v in ps.get("volumes", [])}
    configmaps = {x["metadata"]["name"] for x in docs if x.get("kind") == "ConfigMap"}
    for m in c.get("volumeMounts", []):
        v = volumes.get(m["name"])
        if v is None:
            problems.append(f"volumeMount {m['name']} has no volume")
        elif "configMap" in v and v["configMap"]["name"] not in configmaps:
            problems.append(f"volume {m['name']} references missing ConfigMap {v['configMap']['name']}")
        elif "secret" in v:
            mode = v["secret"].get("defaultMode", 0o644)
            fs_group = (ps.get("securityContext") or {}).get("fsGroup")
            readable = mode & 0o004 or (fs_group == sc.get("runAsGroup") and mode & 0o040)
            if not readable:
                problems.append(f"secret volume {m['name']} (mode {mode:o}) is not readable by uid {sc.get('runAsUser')}")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    pw = env.get("OUTBOX_RELAY_POSTGRES__PASSWORD_FILE")
    if not pw or not any(pw.startswith(m["mountPath"].rstrip("/") + "/") for m in c.get("volumeMounts", [])):
        problems.append("OUTBOX_RELAY_POSTGRES__PASSWORD_FILE must point into a mounted Secret")
    if problems:
        for p in problems:
            fail(f"{ident}: {p}")
    else:
        ok(f"{ident}: relay container hardened, probed, sized, monitored; grace {grace}s")
    return c


def cmd_k8s_policy(args):
    sidecar_path, standalone_path = args
    containers = {}
    for path in args:
        docs = load_docs(path)
        name = rel(path)
        pods = list(relay_pods(docs))
        if not pods:
            fail(f"{name}: no workload runs the {RELAY_CONTAINER} container")
        for d, ps in pods:
            c = check_relay_pod(name, d, ps, docs)
            if d["kind"] == "Deployment":
                containers[path] = c
        for d in docs:
            if d.get("kind") == "PodMonitor":
                eps = d["spec"].get("podMetricsEndpoints", [])
                if d["apiVersion"] != "monitoring.coreos.com/v1" or not eps or eps[0].get("port") != "metrics":
                    fail(f"{name}: PodMonitor/{d['metadata']['name']}: expected monitoring.coreos.com/v1 scraping port `metrics`")
                else:
                    ok(f"{name}: PodMonitor/{d['metadata']['name']}: scrapes port metrics of {d['spec']['selector']['matchLabels']}")
            if d.get("kind") == "PrometheusRule":
                if d.get("spec") != yaml.safe_load(RULES.read_text()):
                    fail(f"{name}: PrometheusRule/{d['metadata']['name']} does not carry the rules of {rel(RULES)}")
                else:
                    ok(f"{name}: PrometheusRule/{d['metadata']['name']}: same rules as {rel(RULES)}")
    if len(containers) == 2:
        a, b = containers.values()
        a = {k: v for k, v in a.items() if k != "image"}
        b = {k: v for k, v in b.items() if k != "image"}
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            fail(f"the relay container differs between the sidecar and standalone overlays in: {diff}")
        else:
            ok("the relay container is identical in the sidecar and standalone overlays")
    standalone = load_docs(standalone_path)
    deps = [d for d in standalone if d.get("kind") == "Deployment"]
    if not deps or deps[0]["spec"].get("replicas") != 2:
        fail("standalone: expected a Deployment with 2 replicas")
    jobs = [d for d in standalone if d.get("kind") == "Job"]
    if not jobs or pod_spec(jobs[0])["containers"][0].get("args") != ["migrate"]:
        fail("standalone: expected a Job running `outbox-relay migrate`")
    else:
        ok("standalone: 2-replica Deployment and a migrate Job")
    finish()


# ---------------------------------------------------------------------------
# Shared libraries of the binary vs. the runtime image's packages
# ---------------------------------------------------------------------------

def runtime_stage_packages():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stages = re.split(r"(?im)^FROM\s+", text)
    last = stages[-1]
    pkgs = set()
    for m in re.finditer(r"apt-get\s+install\s+([^&;\n]*)", last):
        pkgs |= {t for t in m.group(1).split() if not t.startswith("-")}
    base = stages[-1].split()[0]
    return base, pkgs


def dpkg_owner(path):
    candidates = [path, os.path.realpath(path)]
    for p in list(candidates):
        if p.startswith("/usr/"):
            candidates.append(p[4:])
        else:
            candidates.append("/usr" + p)
    for p in candidates:
        r = subprocess.run(["dpkg-query", "-S", p], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.split(":", 1)[0].strip()
    return None


def cmd_runtime_libs(args):
    binary = args[0]
    base, installed = runtime_stage_packages()
    if base != "debian:bookworm-slim":
        fail(f"Dockerfile runtime stage is {base}, but {rel(SLIM_PACKAGES)} describes debian:bookworm-slim")
    slim = {l.strip() for l in SLIM_PACKAGES.read_text().splitlines() if l.strip() and not l.startswith("#")}
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    needed_pkgs = {}
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            fail(f"ldd: {line}")
            continue
        m = re.match(r"(\S+)\s+=>\s+(\S+)", line) or re.match(r"(/\S+)\s+\(", line)
        if not m:
            continue  # linux-vdso
        lib, path = (m.group(1), m.group(2)) if m.lastindex == 2 else (Path(m.group(1)).name, m.group(1))
        pkg = dpkg_owner(path)
        if pkg is None:
            fail(f"{lib} ({path}) belongs to no Debian package")
            continue
        needed_pkgs.setdefault(pkg, []).append(lib)
    for pkg, libs in sorted(needed_pkgs.items()):
        where = "runtime stage installs it" if pkg in installed else "in debian:bookworm-slim" if pkg in slim else None
        if where:
            ok(f"{', '.join(libs)} -> {pkg} ({where})")
        else:
            fail(f"{', '.join(libs)} -> {pkg}: neither installed by the Dockerfile's runtime stage nor in debian:bookworm-slim")
    extra = sorted(installed - set(needed_pkgs) - {"ca-certificates"})
    if extra:
        note(f"runtime stage installs packages the binary does not link: {', '.join(extra)}")
    finish()


COMMANDS = {
    "prometheusrule": cmd_prometheusrule,
    "strip-annotations": cmd_strip_annotations,
    "metrics": cmd_metrics,
    "dashboard-promql": cmd_dashboard_promql,
    "dashboard": cmd_dashboard,
    "config-keys": cmd_config_keys,
    "kustomize": cmd_kustomize,
    "kustomize-compare": cmd_kustomize_compare,
    "k8s-validate": cmd_k8s_validate,
    "k8s-policy": cmd_k8s_policy,
    "runtime-libs": cmd_runtime_libs,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        sys.exit(2)
    COMMANDS[sys.argv[1]](sys.argv[2:])
    finish()
