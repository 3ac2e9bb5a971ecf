#!/usr/bin/env python3
"""Checks what schema validation cannot: the manifests in deploy/ agree with each other and
with the issue's hardening rules.

- every pod running the exporter: runAsNonRoot, readOnlyRootFilesystem, no privilege
  escalation, ALL capabilities dropped, seccomp RuntimeDefault, no service-account token,
  requests and limits for CPU and memory, startup + liveness (/healthz) + readiness
  (/readyz) probes on the `onsip-metrics` port, a grace period long enough to unsubscribe,
  the label podmonitor.yaml selects, the pod name as XMPP resource; a native sidecar has
  `restartPolicy: Always`;
- the PodMonitor selects those pods and scrapes a port they have; the ServiceMonitor selects
  service.yaml's Service and a port it has; that Service selects the standalone pods;
- kustomization.yaml lists files that exist, never the Secret template, and names the
  image the manifests use;
- the Secret template holds placeholders only; package-lock.json names no registry host;
- with ONSIP_UA_EXPORTER_BIN naming a freshly built exporter binary: every flag and ONSIP_*
  variable the manifests use appears in its --help, and `check-config` accepts each pod's
  args and env (Secret values and the pod name stubbed, mount paths moved to a temp dir).
  Without it this is reported as not checked: a binary lying in target/ may be stale.

Usage: python3 deploy/check/policy.py   (from anywhere; exits 1 on any failure)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
ROOT = DEPLOY.parent
EXPORTER = "onsip-ua-exporter"
PORT = "onsip-metrics"
SCRAPE_LABEL = ("onsip-ua-exporter/scrape", "true")
MIN_GRACE_SECONDS = 15  # unsubscribe deadline ~5 s + state file + margin

errors: list[str] = []


def fail(where: str, msg: str) -> None:
    errors.append(f"{where}: {msg}")


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def manifests() -> dict[str, list[dict]]:
    files = sorted(DEPLOY.glob("*.yaml")) + sorted((DEPLOY / "generated").glob("*.yaml"))
    return {
        p.relative_to(DEPLOY).as_posix(): load(p)
        for p in files
        if p.name != "kustomization.yaml"
    }


def selects(selector: dict, labels: dict) -> bool:
    extra = set(selector) - {"matchLabels"}
    if extra:
        raise ValueError(f"selector uses {sorted(extra)}: extend policy.py")
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def check_exporter_container(where: str, c: dict, pod: dict, native: bool) -> None:
    sc = c.get("securityContext") or {}
    psc = pod.get("securityContext") or {}
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        fail(where, "runAsNonRoot is not set")
    if sc.get("readOnlyRootFilesystem") is not True:
        fail(where, "readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        fail(where, "allowPrivilegeEscalation must be false")
    if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
        fail(where, "capabilities must drop ALL")
    seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    if seccomp != "RuntimeDefault":
        fail(where, "seccompProfile must be RuntimeDefault")
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    if uid in (None, 0):
        fail(where, "runAsUser must be a non-zero UID (the image's is 65532)")

    res = c.get("resources") or {}
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in (res.get(kind) or {}):
                fail(where, f"resources.{kind}.{r} missing")

    ports = {p.get("name"): p for p in c.get("ports") or []}
    if PORT not in ports or ports[PORT].get("containerPort") != 9847:
        fail(where, f"needs container port {PORT} = 9847")
    listen = [a for a in c.get("args") or [] if a.startswith("--web.listen-address=")]
    if listen and not listen[0].endswith(":9847"):
        fail(where, f"{listen[0]} does not match containerPort 9847")

    for probe, path in (("startupProbe", None), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        p = c.get(probe)
        if not p:
            fail(where, f"{probe} missing")
            continue
        get = p.get("httpGet") or {}
        if get.get("port") != PORT:
            fail(where, f"{probe} must use port {PORT}")
        if path and get.get("path") != path:
            fail(where, f"{probe} must GET {path} (readiness must not follow the XMPP link)")
        if probe == "startupProbe" and get.get("path") not in ("/healthz", "/readyz"):
            fail(where, "startupProbe must GET /healthz or /readyz")

    env = {e.get("name"): e for e in c.get("env") or []}
    resource = ((env.get("ONSIP_XMPP_RESOURCE") or {}).get("valueFrom") or {}).get("fieldRef") or {}
    if resource.get("fieldPath") != "metadata.name":
        fail(where, "ONSIP_XMPP_RESOURCE must come from the pod name (fieldRef metadata.name): "
             "two exporters on one JID and resource take each other's session over")

    if native and c.get("restartPolicy") != "Always":
        fail(where, "a native sidecar (initContainers) needs restartPolicy: Always")

    mounts = {m.get("mountPath"): m for m in c.get("volumeMounts") or []}
    for arg in c.get("args") or []:
        m = re.match(r"--(?:state\.file|xmpp\.password-file|onsip\.auth-password-file|config\.file)=(.*)", arg)
        if m and not any(m.group(1).startswith(mp.rstrip("/") + "/") for mp in mounts):
            fail(where, f"{arg}: no volume mounted there")
    vols = {v.get("name"): v for v in pod.get("volumes") or []}
    for name, mount in ((m.get("name"), m) for m in mounts.values()):
        vol = vols.get(name)
        if vol is None:
            fail(where, f"volumeMount {name} has no volume")
        elif "secret" in vol and not mount.get("readOnly"):
            fail(where, f"secret volume {name} must be mounted readOnly")


def check_pods(docs: dict[str, list[dict]]) -> list[tuple[str, dict, str]]:
    """Returns (file, pod labels, "standalone" or "sidecar", exporter container, pod spec)."""
    found = []
    for file, objs in docs.items():
        for obj in objs:
            if obj.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet"):
                continue
            where = f"{file} {obj['kind']}/{obj['metadata']['name']}"
            tmpl = obj["spec"]["template"]
            pod = tmpl["spec"]
            labels = (tmpl.get("metadata") or {}).get("labels") or {}
            if not selects(obj["spec"]["selector"], labels):
                fail(where, "spec.selector does not match the pod template's labels")
            main = [c for c in pod.get("containers") or [] if c.get("name") == EXPORTER]
            init = [c for c in pod.get("initContainers") or [] if c.get("name") == EXPORTER]
            if len(main) + len(init) != 1:
                fail(where, f"expected exactly one container named {EXPORTER}")
                continue
            c = (main or init)[0]
            check_exporter_container(f"{where} container {EXPORTER}", c, pod, bool(init))
            if pod.get("automountServiceAccountToken") is not False:
                fail(where, "automountServiceAccountToken must be false")
            psc = pod.get("securityContext") or {}
            if psc.get("runAsNonRoot") is not True:
                fail(where, "pod securityContext.runAsNonRoot must be true")
            if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                fail(where, "pod seccompProfile must be RuntimeDefault")
            if (pod.get("terminationGracePeriodSeconds") or 30) < MIN_GRACE_SECONDS:
                fail(where, f"terminationGracePeriodSeconds below {MIN_GRACE_SECONDS}")
            if labels.get(SCRAPE_LABEL[0]) != SCRAPE_LABEL[1]:
                fail(where, f"pod template needs label {SCRAPE_LABEL[0]}: \"{SCRAPE_LABEL[1]}\"")
            # Every other container is hardened too (the example application).
            for other in (pod.get("containers") or []) + (pod.get("initContainers") or []):
                if other is c:
                    continue
                osc = other.get("securityContext") or {}
                if osc.get("allowPrivilegeEscalation") is not False or \
                        (osc.get("capabilities") or {}).get("drop") != ["ALL"]:
                    fail(f"{where} container {other.get('name')}",
                         "needs allowPrivilegeEscalation: false and capabilities drop ALL")
            kind = "standalone" if len(pod.get("containers") or []) == 1 and main else "sidecar"
            found.append((file, labels, kind, c, pod))
    return found


def check_monitors(docs: dict[str, list[dict]], pods: list) -> None:
    by_kind: dict[str, list[tuple[str, dict]]] = {}
    for file, objs in docs.items():
        for obj in objs:
            by_kind.setdefault(obj.get("kind"), []).append((file, obj))

    for file, pm in by_kind.get("PodMonitor", []):
        where = f"{file} PodMonitor/{pm['metadata']['name']}"
        sel = pm["spec"]["selector"]
        matched = [p for p in pods if selects(sel, p[1])]
        if len(matched) != len(pods):
            fail(where, "does not select every exporter pod: "
                 + ", ".join(p[0] for p in pods if p not in matched))
        for ep in pm["spec"].get("podMetricsEndpoints") or []:
            if ep.get("port") != PORT:
                fail(where, f"endpoint port must be {PORT}")
            if ep.get("path", "/metrics") != "/metrics":
                fail(where, "endpoint path must be /metrics")

    services = by_kind.get("Service", [])
    for file, sm in by_kind.get("ServiceMonitor", []):
        where = f"{file} ServiceMonitor/{sm['metadata']['name']}"
        sel = sm["spec"]["selector"]
        matched = [(f, s) for f, s in services if selects(sel, s["metadata"].get("labels") or {})]
        if len(matched) != 1:
            fail(where, f"selects {len(matched)} Service(s) in deploy/, expected 1")
            continue
        svc = matched[0][1]
        port_names = {p.get("name") for p in svc["spec"]["ports"]}
        for ep in sm["spec"].get("endpoints") or []:
            if ep.get("port") not in port_names:
                fail(where, f"endpoint port {ep.get('port')!r} is not a port of the Service")
            if ep.get("path", "/metrics") != "/metrics":
                fail(where, "endpoint path must be /metrics")
    for file, svc in services:
        where = f"{file} Service/{svc['metadata']['name']}"
        backs = [p for p in pods if p[2] == "standalone" and selects(
            {"matchLabels": svc["spec"].get("selector") or {}}, p[1])]
        if not backs:
            fail(where, "selects no standalone exporter pod")
        for port in svc["spec"]["ports"]:
            if port.get("targetPort") != PORT:
                fail(where, f"targetPort must be {PORT}")


def check_kustomization(docs: dict[str, list[dict]]) -> None:
    path = DEPLOY / "kustomization.yaml"
    kz = yaml.safe_load(path.read_text(encoding="utf-8"))
    where = "kustomization.yaml"
    if kz.get("kind") != "Kustomization" or \
            kz.get("apiVersion") != "kustomize.config.k8s.io/v1beta1":
        fail(where, "expected apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization")
    known = {"apiVersion", "kind", "resources", "images", "namespace", "labels",
             "commonAnnotations", "patches", "configMapGenerator", "secretGenerator"}
    for key in set(kz) - known:
        fail(where, f"unexpected key {key!r}")
    resources = kz.get("resources") or []
    if not resources:
        fail(where, "lists no resources")
    for res in resources:
        if not (DEPLOY / res).is_file():
            fail(where, f"resource {res} does not exist")
        if "secret" in res:
            fail(where, f"{res}: the Secret template must not be applied by kustomize")
    images = {i.get("name") for i in kz.get("images") or []}
    used = {
        c["image"].rsplit(":", 1)[0]
        for objs in docs.values() for obj in objs if obj.get("kind") == "Deployment"
        for c in (obj["spec"]["template"]["spec"].get("containers") or [])
        + (obj["spec"]["template"]["spec"].get("initContainers") or [])
        if c.get("name") == EXPORTER
    }
    if used != images & used or len(used) != 1:
        fail(where, f"images: must name the exporter image the manifests use ({sorted(used)})")


def check_secret_template(docs: dict[str, list[dict]]) -> None:
    for file, objs in docs.items():
        for obj in objs:
            if obj.get("kind") != "Secret":
                continue
            if "data" in obj:
                fail(file, "a Secret in the repo must not carry `data` (real values)")
            for key, value in (obj.get("stringData") or {}).items():
                if "password" in key and value != "CHANGE-ME":
                    fail(file, f"stringData.{key} must be the placeholder CHANGE-ME")


def check_lockfile() -> None:
    lock = json.loads((DEPLOY / "check" / "package-lock.json").read_text(encoding="utf-8"))
    for name, pkg in (lock.get("packages") or {}).items():
        if "resolved" in pkg:
            fail("check/package-lock.json", f"{name or '(root)'} has a `resolved` field "
                 "(a registry host name): reinstall with deploy/check/.npmrc in effect")


def exporter_binary() -> Path | None:
    env = os.environ.get("ONSIP_UA_EXPORTER_BIN")
    return Path(env) if env else None


def check_flags(pods: list) -> None:
    binary = exporter_binary()
    if binary is None:
        print("policy.py: NOTE: ONSIP_UA_EXPORTER_BIN not set: the manifests' flags and env "
              "names were NOT checked against the exporter's --help")
        return
    try:
        out = subprocess.run([str(binary), "--help"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        fail(str(binary), f"--help failed: {err}")
        return
    before = len(errors)
    for file, _labels, _kind, c, _pod in pods:
        for arg in c.get("args") or []:
            flag = arg.split("=", 1)[0]
            if not re.search(rf"(?<![\w.-]){re.escape(flag)}(?![\w.-])", out):
                fail(file, f"{flag}: not in `{EXPORTER} --help`")
        for env in c.get("env") or []:
            name = env.get("name", "")
            if name.startswith("ONSIP_") and name not in out:
                fail(file, f"env {name}: not in `{EXPORTER} --help`")
    if len(errors) != before:
        return
    print(f"policy.py: the manifests' flags and ONSIP_* variables are in {binary} --help")
    for file, _labels, _kind, c, pod in pods:
        check_config(binary, file, c, pod)


def check_config(binary: Path, file: str, c: dict, pod: dict) -> None:
    """Runs `check-config` with the container's args and env, as the kubelet would set them."""
    secret_values = {"jid": "alice@example.onsip.com", "xmpp-password": "placeholder",
                     "auth-password": "placeholder"}
    vols = {v.get("name"): v for v in pod.get("volumes") or []}
    with tempfile.TemporaryDirectory() as tmp:
        moved: list[tuple[str, str]] = []
        for m in c.get("volumeMounts") or []:
            local = Path(tmp) / m["name"]
            local.mkdir()
            if "secret" in vols.get(m["name"], {}):
                for key, value in secret_values.items():
                    (local / key).write_text(value, encoding="utf-8")
            moved.append((m["mountPath"].rstrip("/"), str(local)))

        def local_path(value: str) -> str:
            for mount, local in moved:
                if value == mount or value.startswith(mount + "/"):
                    return local + value[len(mount):]
            return value

        args = []
        for arg in c.get("args") or []:
            flag, eq, value = arg.partition("=")
            args.append(flag + eq + local_path(value) if eq else arg)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ONSIP_")}
        for e in c.get("env") or []:
            ref = e.get("valueFrom") or {}
            if "value" in e:
                env[e["name"]] = local_path(e["value"])
            elif "secretKeyRef" in ref:
                env[e["name"]] = secret_values[ref["secretKeyRef"]["key"]]
            elif (ref.get("fieldRef") or {}).get("fieldPath") == "metadata.name":
                env[e["name"]] = "example-6d4cf56db6-x7k2p"
            else:
                fail(file, f"env {e.get('name')}: policy.py cannot stub this source")
                return
        # The exporter's flags precede the subcommand.
        proc = subprocess.run([str(binary), *args, "check-config"], capture_output=True,
                              text=True, timeout=30, env=env, cwd=tmp)
        if proc.returncode != 0:
            fail(file, f"`{EXPORTER} check-config` rejects the container's args/env: "
                 + (proc.stderr or proc.stdout).strip().replace("\n", " | "))
        else:
            print(f"policy.py: {file}: check-config accepts the container's args and env")


def main() -> int:
    docs = manifests()
    pods = check_pods(docs)
    kinds = {p[2] for p in pods}
    if len(pods) < 3 or kinds != {"standalone", "sidecar"}:
        fail("deploy/", "expected the standalone Deployment and both sidecar examples")
    check_monitors(docs, pods)
    check_kustomization(docs)
    check_secret_template(docs)
    check_lockfile()
    check_flags(pods)
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    if errors:
        return 1
    print(f"policy.py: {len(pods)} exporter pod templates and their monitors consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
