"""`kvmpod list`, `status` and `gc`: the pods on this host."""

from __future__ import annotations

import argparse
import json
import time

from kvmpod.pod.registry import find_pod, gc, list_pods


def cmd_list(ns: argparse.Namespace) -> int:

    pods = [p.summary() for p in list_pods()]
    if ns.json:
        print(json.dumps(pods, indent=2))
        return 0
    print(f"{'UUID':36}  {'STATE':9}  {'APPS':20}  {'BACKEND':24}  IPS")
    for pod in pods:
        apps = ", ".join(a.get("name", "?") for a in pod["apps"])
        ips = ", ".join(f"{n.get('network')}:{ip}" for n in pod.get("networks", []) for ip in n.get("ips", []))
        backend = f"libvirt:{pod['domain']}" if pod.get("domain") else pod.get("backend", "qemu")
        print(f"{pod['uuid']:36}  {pod['state']:9}  {apps:20}  {backend:24}  {ips}".rstrip())
    return 0


def cmd_status(ns: argparse.Namespace) -> int:

    pod = find_pod(ns.uuid)
    summary = {**pod.summary(), "timings": pod.state.get("timings", {})}
    if ns.json:
        print(json.dumps(summary, indent=2))
        return 0
    timings = summary["timings"]
    lines = [("uuid", summary["uuid"]), ("state", summary["state"]),
             ("created", _when(summary.get("created"))), ("started", _when(timings.get("apps_started"))),
             ("ended", _when(timings.get("vm_ended"))), ("path", summary["path"]),
             ("backend", summary.get("backend")),
             ("domain", f"{summary['domain']} on {summary.get('libvirt_uri')}" if summary.get("domain") else "")]
    if error := pod.state.get("error"):
        lines.append(("error", error))
    for key, value in lines:
        if value:
            print(f"{key + ':':9}{value}")
    for net in summary.get("networks", []):
        print(f"network {net.get('network')}: {net.get('interface')} {', '.join(net.get('ips', []))} "
              f"(MAC {net.get('mac')})")
    if cgroup := summary.get("cgroup"):
        print(f"cgroup:  {cgroup.get('name')} ({_limits(cgroup.get('limits'), cgroup.get('controllers'))})")
    for app in summary["apps"]:
        print(f"app {app.get('name')}: {app.get('exit', 'running')} (image {app.get('image', '?')[:19]}…)")
    return 0


def _limits(limits: object, controllers: object) -> str:
    """A cgroup's limits as state.json records them (kvmpod/vm/cgroup.py), in one line."""
    if not isinstance(limits, dict) or not isinstance(controllers, dict):
        return "?"
    parts = []
    if "memory" in controllers:
        parts.append(f"memory {int(limits.get('memory_bytes', 0)) >> 20} MiB, swap {int(limits.get('swap_bytes', 0)) >> 20} MiB")
    if "pids" in controllers:
        parts.append(f"pids {limits.get('pids')}")
    if "cpu" in controllers and limits.get("cpu_quota_us"):
        parts.append(f"cpu {int(limits['cpu_quota_us']) / int(limits.get('cpu_period_us') or 100000):g} CPUs")
    return ", ".join(parts) or "no limits"


def _when(stamp: object) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if isinstance(stamp, (int, float)) else ""


def cmd_gc(ns: argparse.Namespace) -> int:
    for uuid in gc(ns.grace_period):
        print(f"removed pod {uuid}")
    return 0


