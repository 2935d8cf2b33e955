"""ImageManifest validation: the JSON Schema, the rules in code, one exact error line per problem."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpod.errors import ManifestError
from kvmpod.image import manifest as m
from kvmpod.image import names
from kvmpod.image.manifest import (
    App, Dependency, EnvVar, ImageManifest, Isolator, MountPoint, Port, build_manifest, check_runnable,
    parse_manifest,
)

IMAGE_ID = "sha512-" + "ab" * 64

# spec/aci.md's example manifest. Its dependency's imageID is the placeholder "sha512-...", which
# is not an Image ID; a real one stands in for it.
SPEC_EXAMPLE = {
    "acKind": "ImageManifest",
    "acVersion": "0.5.2",
    "name": "example.com/reduce-worker",
    "labels": [{"name": "version", "value": "1.0.0"}, {"name": "arch", "value": "amd64"},
               {"name": "os", "value": "linux"}],
    "app": {
        "exec": ["/usr/bin/reduce-worker", "--quiet"],
        "user": "100",
        "group": "300",
        "eventHandlers": [{"exec": ["/usr/bin/data-downloader"], "name": "pre-start"},
                          {"exec": ["/usr/bin/deregister-worker", "--verbose"], "name": "post-stop"}],
        "workingDirectory": "/opt/work",
        "environment": [{"name": "REDUCE_WORKER_DEBUG", "value": "true"}],
        "isolators": [
            {"name": "resource/cpu", "value": {"request": "250", "limit": "500"}},
            {"name": "resource/memory", "value": {"request": "1G", "limit": "2G"}},
            {"name": "os/linux/capabilities-retain-set", "value": {"set": ["CAP_NET_BIND_SERVICE"]}},
        ],
        "mountPoints": [{"name": "work", "path": "/var/lib/work", "readOnly": False}],
        "ports": [{"name": "health", "port": 4000, "protocol": "tcp", "socketActivated": True},
                  {"name": "ftp-data", "port": 20000, "count": 1000, "protocol": "tcp"}],
    },
    "dependencies": [{"imageName": "example.com/reduce-worker-base", "imageID": IMAGE_ID,
                      "labels": [{"name": "os", "value": "linux"}, {"name": "env", "value": "canary"}],
                      "size": 22017258}],
    "pathWhitelist": ["/etc/ca/example.com/crt", "/usr/bin/map-reduce-worker", "/opt/libs/reduce-toolkit.so",
                      "/etc/reduce-worker.conf", "/etc/systemd/system/"],
    "annotations": [
        {"name": "authors",
         "value": "Carly Container <carly@example.com>, Nat Network <[nat@example.com](mailto:nat@example.com)>"},
        {"name": "created", "value": "2014-10-27T19:32:27.67021798Z"},
        {"name": "documentation", "value": "https://example.com/docs"},
        {"name": "homepage", "value": "https://example.com"},
    ],
}

# The same example as spec 0.8.10 prints it: milli-core CPU, supplementary GIDs spelled
# "supplementaryGids" (an unknown key, so ignored) and the systemd-notify annotation, whose value
# the example gives as JSON false although annotation values are strings; "false" stands in for it.
SPEC_EXAMPLE_0_8 = copy.deepcopy(SPEC_EXAMPLE)
SPEC_EXAMPLE_0_8["acVersion"] = "0.8.10"
SPEC_EXAMPLE_0_8["app"]["supplementaryGids"] = [400, 500]
SPEC_EXAMPLE_0_8["app"]["isolators"][0]["value"] = {"request": "250m", "limit": "500m"}
SPEC_EXAMPLE_0_8["annotations"].append({"name": "appc.io/executor/supports-systemd-notify", "value": "false"})

MINIMAL = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": "example.com/t",
           "app": {"exec": ["/bin/true"], "user": "0", "group": "0"}}


def _parse(obj: object) -> ImageManifest:
    return parse_manifest(json.dumps(obj).encode())


def _error(obj: object) -> str:
    with pytest.raises(ManifestError) as info:
        _parse(obj)
    line = str(info.value)
    assert "\n" not in line
    return line


def _shown(text: str) -> str:
    """A long string as error lines show it: JSON, cut to 60 characters."""
    return json.dumps(text)[:57] + "..."


def _with_app(**fields: object) -> dict:
    return {**MINIMAL, "app": {**MINIMAL["app"], **fields}}


def _iso(name: str, value: object) -> dict:
    return _with_app(isolators=[{"name": name, "value": value}])


# ---- valid manifests ---------------------------------------------------------------------------

def test_the_spec_example_parses_into_every_field():
    im = _parse(SPEC_EXAMPLE)
    assert im.name == "example.com/reduce-worker" and im.display_name == "example.com/reduce-worker:1.0.0"
    assert im.labels == {"version": "1.0.0", "arch": "amd64", "os": "linux"}
    assert im.app == App(
        exec=["/usr/bin/reduce-worker", "--quiet"], user="100", group="300", working_directory="/opt/work",
        environment=[EnvVar("REDUCE_WORKER_DEBUG", "true")], supplementary_gids=[],
        event_handlers={"pre-start": ["/usr/bin/data-downloader"],
                        "post-stop": ["/usr/bin/deregister-worker", "--verbose"]},
        isolators=[Isolator("resource/cpu", {"request": "250", "limit": "500"}),
                   Isolator("resource/memory", {"request": "1G", "limit": "2G"}),
                   Isolator("os/linux/capabilities-retain-set", {"set": ["CAP_NET_BIND_SERVICE"]})],
        mount_points=[MountPoint("work", "/var/lib/work", False)],
        ports=[Port("health", "tcp", 4000, 1, True), Port("ftp-data", "tcp", 20000, 1000, False)],
    )
    assert im.dependencies == [Dependency("example.com/reduce-worker-base", IMAGE_ID,
                                          {"os": "linux", "env": "canary"}, 22017258)]
    assert im.path_whitelist[0] == "/etc/ca/example.com/crt" and len(im.path_whitelist) == 5
    assert im.annotations["homepage"] == "https://example.com"
    assert im.raw == SPEC_EXAMPLE
    check_runnable(im)


def test_the_spec_0_8_example_parses_and_its_unknown_key_is_kept_only_in_raw():
    im = _parse(SPEC_EXAMPLE_0_8)
    assert im.app is not None and im.app.supplementary_gids == []
    assert im.raw["app"]["supplementaryGids"] == [400, 500]
    assert im.annotations["appc.io/executor/supports-systemd-notify"] == "false"


def test_minimal_manifest_defaults():
    im = _parse({"acKind": "ImageManifest", "acVersion": "0.8.11", "name": "t"})
    assert im == ImageManifest("t", {}, None, im.raw)
    assert im.annotations == {} and im.dependencies == [] and im.path_whitelist == []
    app = _parse(_with_app(exec=[])).app
    assert app == App([], "0", "0") and app.working_directory == "/" and app.ports == []


@pytest.mark.parametrize("change", [
    {"app": None},                                                        # same as no app
    {"futureField": {"anything": [1, 2.5, None]}},                        # unknown keys pass everywhere
    {"app": {**MINIMAL["app"], "futureAppField": 1}},
    {"labels": [{"name": "arch", "value": "whatever"}]},                 # arch means nothing without os
    {"labels": [{"name": "os", "value": "freebsd"}, {"name": "arch", "value": "arm"}]},
    {"labels": [{"name": "os", "value": "linux"}, {"name": "arch", "value": "s390x"}]},
    {"acVersion": "1.0.0-rc.1+build.5"},
    {"dependencies": [{"imageName": "a", "imageID": "sha512-" + "0" * 64}]},
    {"pathWhitelist": []},
])
def test_valid_variants(change):
    _parse({**MINIMAL, **change})


@pytest.mark.parametrize("name, value", [
    ("resource/memory", {"limit": "512Mi"}),
    ("resource/memory", {"request": 1048576, "limit": "1.5Gi", "default": False}),
    ("resource/cpu", {"limit": 0.5}),
    ("resource/block-iops", {"default": True, "limit": "1000"}),
    ("resource/network-bandwidth", {"default": True, "limit": "1G"}),
    ("os/linux/capabilities-remove-set", {"set": ["CAP_SYS_CHROOT", "CAP_MKNOD"]}),
    ("os/linux/no-new-privileges", False),
    ("os/linux/seccomp-remove-set", {"errno": "ENOTSUP", "set": ["reboot", "@appc.io/empty"]}),
    ("os/linux/seccomp-retain-set", {"errno": "", "set": ["read"]}),
    ("os/linux/selinux-context", {"user": "system_u", "role": "system_r", "type": "dhcpc_t", "level": "s0:c1"}),
    ("os/linux/oom-score-adj", -1000),
    ("os/linux/cpu-shares", 262144),
    ("os/unix/sysctl", {"net.ipv4.tcp_mtu_probing": "1"}),
    ("example.com/unknown-isolator", ["anything", {"at": "all"}]),
])
def test_valid_isolators(name, value):
    assert _parse(_iso(name, value)).app.isolators == [Isolator(name, value)]


# ---- every rule, one exact line ----------------------------------------------------------------

CASES = [
    # top level
    ({"acKind": "ImageManifest", "name": "t"}, "acVersion: required field is missing"),
    ({**MINIMAL, "acKind": "PodManifest"}, 'acKind: "PodManifest" is not "ImageManifest"'),
    ({**MINIMAL, "acKind": 7}, "acKind: 7 is not a string"),
    ({**MINIMAL, "acVersion": "0.8"}, 'acVersion: "0.8" is not a semantic version (like "0.8.11")'),
    ({**MINIMAL, "acVersion": "01.8.11"}, 'acVersion: "01.8.11" is not a semantic version (like "0.8.11")'),
    ({**MINIMAL, "name": "Not_An_Identifier"}, 'name: "Not_An_Identifier" is not an AC Identifier'),
    ({**MINIMAL, "name": "example.com/"}, 'name: "example.com/" is not an AC Identifier'),
    ({**MINIMAL, "name": "web\n"}, 'name: "web\\n" is not an AC Identifier'),
    # labels
    ({**MINIMAL, "labels": {"os": "linux"}}, 'labels: {"os": "linux"} is not a list'),
    ({**MINIMAL, "labels": ["os"]}, 'labels[0]: "os" is not an object'),
    ({**MINIMAL, "labels": [{"name": "os"}]}, "labels[0].value: required field is missing"),
    ({**MINIMAL, "labels": [{"name": "OS", "value": "linux"}]}, 'labels[0].name: "OS" is not an AC Identifier'),
    ({**MINIMAL, "labels": [{"name": "v", "value": 2}]}, "labels[0].value: 2 is not a string"),
    ({**MINIMAL, "labels": [{"name": "version", "value": "1"}, {"name": "os", "value": "linux"},
                            {"name": "os", "value": "linux"}]},
     'labels[2].name: "os" is a duplicate label name'),
    ({**MINIMAL, "labels": [{"name": "name", "value": "x"}]}, 'labels[0].name: "name" is a reserved label name'),
    ({**MINIMAL, "labels": [{"name": "os", "value": "plan9"}]},
     'labels[0].value: "plan9" is not a known os (darwin, freebsd, linux)'),
    ({**MINIMAL, "labels": [{"name": "os", "value": "linux"}, {"name": "arch", "value": "arm64"}]},
     'labels[1].value: "arm64" is not an arch of os "linux" '
     "(amd64, i386, aarch64, aarch64_be, armv6l, armv7l, armv7b, ppc64, ppc64le, s390x)"),
    ({**MINIMAL, "labels": [{"name": "arch", "value": "amd64"}, {"name": "os", "value": "darwin"}]},
     'labels[0].value: "amd64" is not an arch of os "darwin" (x86_64, i386)'),
    # app
    ({**MINIMAL, "app": []}, "app: [] is not an object or null"),
    ({**MINIMAL, "app": {"exec": ["/bin/sh"], "group": "0"}}, "app.user: required field is missing"),
    (_with_app(user=""), 'app.user: "" is an empty string'),
    (_with_app(group=0), "app.group: 0 is not a string"),
    (_with_app(exec="/bin/sh"), 'app.exec: "/bin/sh" is not a list'),
    (_with_app(exec=["bin/sh"]), 'app.exec[0]: "bin/sh" is not an absolute path'),
    (_with_app(exec=["/bin/sh", 5]), "app.exec[1]: 5 is not a string"),
    (_with_app(workingDirectory="work"), 'app.workingDirectory: "work" is not an absolute path'),
    (_with_app(supplementaryGIDs=[-1]), "app.supplementaryGIDs[0]: -1 is not a non-negative integer"),
    (_with_app(supplementaryGIDs=[1, True]), "app.supplementaryGIDs[1]: true is not an integer"),
    (_with_app(supplementaryGIDs=[4294967295]), "app.supplementaryGIDs[0]: 4294967295 is not between 0 and 4294967294"),
    # eventHandlers
    (_with_app(eventHandlers=[{"name": "pre-stop", "exec": ["/x"]}]),
     'app.eventHandlers[0].name: "pre-stop" is not one of "pre-start", "post-stop"'),
    (_with_app(eventHandlers=[{"name": "pre-start", "exec": []}]), "app.eventHandlers[0].exec: [] is an empty list"),
    (_with_app(eventHandlers=[{"name": "pre-start"}]), "app.eventHandlers[0].exec: required field is missing"),
    (_with_app(eventHandlers=[{"name": "pre-start", "exec": ["x"]}]),
     'app.eventHandlers[0].exec[0]: "x" is not an absolute path'),
    (_with_app(eventHandlers=[{"name": "post-stop", "exec": ["/a"]}, {"name": "post-stop", "exec": ["/b"]}]),
     'app.eventHandlers[1].name: "post-stop" is a duplicate event handler name'),
    # environment
    (_with_app(environment=[{"name": "A", "value": 1}]), "app.environment[0].value: 1 is not a string"),
    (_with_app(environment=[{"name": "A=B", "value": "1"}]),
     'app.environment[0].name: "A=B" is not an environment variable name (non-empty, without "=" or NUL)'),
    (_with_app(environment=[{"name": "", "value": "1"}]),
     'app.environment[0].name: "" is not an environment variable name (non-empty, without "=" or NUL)'),
    (_with_app(environment=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
     'app.environment[1].name: "A" is a duplicate environment variable name'),
    # mountPoints
    (_with_app(mountPoints=[{"name": "data", "path": "/d"}, {"name": "Data_Dir", "path": "/e"}]),
     'app.mountPoints[1].name: "Data_Dir" is not an AC Name'),
    (_with_app(mountPoints=[{"name": "a.b", "path": "/d"}]), 'app.mountPoints[0].name: "a.b" is not an AC Name'),
    (_with_app(mountPoints=[{"name": "data", "path": "d"}]), 'app.mountPoints[0].path: "d" is not an absolute path'),
    (_with_app(mountPoints=[{"name": "data"}]), "app.mountPoints[0].path: required field is missing"),
    (_with_app(mountPoints=[{"name": "data", "path": "/d", "readOnly": "yes"}]),
     'app.mountPoints[0].readOnly: "yes" is not a boolean'),
    (_with_app(mountPoints=[{"name": "data", "path": "/d"}, {"name": "data", "path": "/e"}]),
     'app.mountPoints[1].name: "data" is a duplicate mount point name'),
    # ports
    (_with_app(ports=[{"name": "http", "protocol": "tcp"}]), "app.ports[0].port: required field is missing"),
    (_with_app(ports=[{"name": "http", "protocol": "tcp", "port": 0}]), "app.ports[0].port: 0 is not between 1 and 65535"),
    (_with_app(ports=[{"name": "http", "protocol": "tcp", "port": 65536}]),
     "app.ports[0].port: 65536 is not between 1 and 65535"),
    (_with_app(ports=[{"name": "http", "protocol": "tcp", "port": 80.0}]), "app.ports[0].port: 80.0 is not an integer"),
    (_with_app(ports=[{"name": "http", "protocol": "tcp", "port": 80, "count": 0}]), "app.ports[0].count: 0 is less than 1"),
    (_with_app(ports=[{"name": "http", "protocol": 6, "port": 80}]), "app.ports[0].protocol: 6 is not a string"),
    (_with_app(ports=[{"name": "HTTP", "protocol": "tcp", "port": 80}]), 'app.ports[0].name: "HTTP" is not an AC Name'),
    (_with_app(ports=[{"name": "http", "protocol": "tcp", "port": 80, "socketActivated": 1}]),
     "app.ports[0].socketActivated: 1 is not a boolean"),
    (_with_app(ports=[{"name": "ftp", "protocol": "tcp", "port": 65000, "count": 1000}]),
     "app.ports[0].count: 1000 ports from 65000 end past 65535"),
    (_with_app(ports=[{"name": "http", "protocol": "tcp", "port": 80}, {"name": "http", "protocol": "udp", "port": 80}]),
     'app.ports[1].name: "http" is a duplicate port name'),
    # userAnnotations / userLabels
    (_with_app(userAnnotations=["a"]), 'app.userAnnotations: ["a"] is not an object'),
    (_with_app(userLabels={"tier": "web", "some key": 1}), 'app.userLabels["some key"]: 1 is not a string'),
    # isolators
    (_with_app(isolators={"name": "x"}), 'app.isolators: {"name": "x"} is not a list'),
    (_with_app(isolators=[{"name": "resource/memory"}]), "app.isolators[0].value: required field is missing"),
    (_iso("Resource/Memory", 1), 'app.isolators[0].name: "Resource/Memory" is not an AC Identifier'),
    (_iso("resource/memory", {"limit": "1Q"}), 'app.isolators[0].value.limit: "1Q" is not a resource quantity'),
    (_iso("resource/memory", {"request": -5}), "app.isolators[0].value.request: -5 is not a resource quantity"),
    (_iso("resource/memory", {"limit": True}), "app.isolators[0].value.limit: true is not a string or a number"),
    (_iso("resource/memory", "1G"), 'app.isolators[0].value: "1G" is not an object'),
    (_iso("resource/cpu", {"limit": "1", "default": True}), 'app.isolators[0].value.default: true is not false'),
    (_iso("resource/block-bandwidth", {"limit": "2M"}), "app.isolators[0].value.default: required field is missing"),
    (_iso("resource/block-iops", {"default": False, "limit": "1"}), "app.isolators[0].value.default: false is not true"),
    (_iso("resource/network-bandwidth", {"default": True, "limit": "1G", "request": "1M"}),
     'app.isolators[0].value.request: "1M" is not allowed here'),
    (_iso("os/linux/capabilities-retain-set", {"set": []}), "app.isolators[0].value.set: [] is an empty list"),
    (_iso("os/linux/capabilities-retain-set", {"set": ["NET_ADMIN"]}),
     'app.isolators[0].value.set[0]: "NET_ADMIN" is not a capability name (CAP_...)'),
    (_iso("os/linux/capabilities-remove-set", ["CAP_KILL"]), 'app.isolators[0].value: ["CAP_KILL"] is not an object'),
    (_iso("os/linux/capabilities-remove-set", {}), "app.isolators[0].value.set: required field is missing"),
    (_iso("os/linux/no-new-privileges", "true"), 'app.isolators[0].value: "true" is not a boolean'),
    (_iso("os/linux/seccomp-remove-set", {"set": ["reboot"], "errno": "enotsup"}),
     'app.isolators[0].value.errno: "enotsup" is not an errno name (upper case, like "EPERM") or ""'),
    (_iso("os/linux/seccomp-retain-set", {"set": [""]}), 'app.isolators[0].value.set[0]: "" is an empty string'),
    (_iso("os/linux/seccomp-retain-set", {"errno": "EPERM"}), "app.isolators[0].value.set: required field is missing"),
    (_iso("os/linux/oom-score-adj", -1001), "app.isolators[0].value: -1001 is not between -1000 and 1000"),
    (_iso("os/linux/oom-score-adj", "5"), 'app.isolators[0].value: "5" is not an integer'),
    (_iso("os/linux/cpu-shares", 1), "app.isolators[0].value: 1 is not between 2 and 262144"),
    (_iso("os/linux/selinux-context", {"user": "a:b", "role": "r", "type": "t", "level": "s0"}),
     'app.isolators[0].value.user: "a:b" is not an SELinux user, role or type (non-empty, without ":")'),
    (_iso("os/linux/selinux-context", {"user": "u", "role": "r", "type": "t"}),
     "app.isolators[0].value.level: required field is missing"),
    (_iso("os/unix/sysctl", {"net.core.somaxconn": 1024}),
     'app.isolators[0].value["net.core.somaxconn"]: 1024 is not a string'),
    (_with_app(isolators=[{"name": "os/linux/oom-score-adj", "value": 1}, {"name": "os/linux/oom-score-adj", "value": 2}]),
     'app.isolators[1].name: "os/linux/oom-score-adj" is given twice (also app.isolators[0])'),
    (_with_app(isolators=[{"name": "os/linux/seccomp-remove-set", "value": {"set": ["reboot"]}},
                          {"name": "os/linux/seccomp-retain-set", "value": {"set": ["read"]}}]),
     'app.isolators[1].name: "os/linux/seccomp-retain-set" cannot be used with "os/linux/seccomp-remove-set" '
     "(app.isolators[0])"),
    (_with_app(isolators=[{"name": "os/linux/capabilities-retain-set", "value": {"set": ["CAP_KILL"]}},
                          {"name": "os/linux/capabilities-remove-set", "value": {"set": ["CAP_KILL"]}}]),
     'app.isolators[1].name: "os/linux/capabilities-remove-set" cannot be used with '
     '"os/linux/capabilities-retain-set" (app.isolators[0])'),
    # annotations
    ({**MINIMAL, "annotations": [{"name": "Created", "value": "x"}]}, 'annotations[0].name: "Created" is not an AC Identifier'),
    ({**MINIMAL, "annotations": [{"name": "created", "value": False}]}, "annotations[0].value: false is not a string"),
    ({**MINIMAL, "annotations": [{"name": "a", "value": "1"}, {"name": "a", "value": "2"}]},
     'annotations[1].name: "a" is a duplicate annotation name'),
    # dependencies
    ({**MINIMAL, "dependencies": [{"imageID": IMAGE_ID}]}, "dependencies[0].imageName: required field is missing"),
    ({**MINIMAL, "dependencies": [{"imageName": "Base"}]}, 'dependencies[0].imageName: "Base" is not an AC Identifier'),
    ({**MINIMAL, "dependencies": [{"imageName": "b", "imageID": "sha512-..."}]},
     'dependencies[0].imageID: "sha512-..." is not an image ID ("sha512-" and 64 to 128 lower-case hex digits)'),
    ({**MINIMAL, "dependencies": [{"imageName": "b", "imageID": "sha256-" + "0" * 64}]},
     f"dependencies[0].imageID: {_shown('sha256-' + '0' * 64)} "
     'is not an image ID ("sha512-" and 64 to 128 lower-case hex digits)'),
    ({**MINIMAL, "dependencies": [{"imageName": "b", "imageID": "sha512-" + "0" * 129}]},
     f"dependencies[0].imageID: {_shown('sha512-' + '0' * 129)} "
     'is not an image ID ("sha512-" and 64 to 128 lower-case hex digits)'),
    ({**MINIMAL, "dependencies": [{"imageName": "b", "size": -1}]}, "dependencies[0].size: -1 is not a non-negative integer"),
    ({**MINIMAL, "dependencies": [{"imageName": "b", "labels": [{"name": "os", "value": "linux"},
                                                                 {"name": "os", "value": "linux"}]}]},
     'dependencies[0].labels[1].name: "os" is a duplicate label name'),
    ({**MINIMAL, "dependencies": [{"imageName": "b", "labels": [{"name": "os", "value": "windows"}]}]},
     'dependencies[0].labels[0].value: "windows" is not a known os (darwin, freebsd, linux)'),
    ({**MINIMAL, "dependencies": {"imageName": "b"}}, 'dependencies: {"imageName": "b"} is not a list'),
    # pathWhitelist
    ({**MINIMAL, "pathWhitelist": ["/etc", "usr/bin"]}, 'pathWhitelist[1]: "usr/bin" is not an absolute path'),
    ({**MINIMAL, "pathWhitelist": "/etc"}, 'pathWhitelist: "/etc" is not a list'),
]


@pytest.mark.parametrize("obj, line", CASES, ids=[line.split(":")[0] for _, line in CASES])
def test_each_rule_fails_with_one_exact_line(obj, line):
    assert _error(obj) == f"manifest: {line}"


def test_wrong_types_everywhere_is_still_one_precise_line():
    obj = {"acKind": 1, "acVersion": 2, "name": 3, "labels": 4, "app": 5, "annotations": 6,
           "dependencies": 7, "pathWhitelist": 8}
    assert _error(obj) == "manifest: acKind: 1 is not a string"
    # a missing required field outranks wrong types below it; a parent's error outranks its children's
    assert _error({"name": 3, "app": {"user": 1, "exec": [2]}}) == "manifest: acKind: required field is missing"
    assert _error({**MINIMAL, "app": {"user": 1, "exec": [2]}}) == "manifest: app.group: required field is missing"
    assert _error({**MINIMAL, "app": {"user": 1, "group": 2, "exec": [3]}}) == "manifest: app.user: 1 is not a string"


def test_a_huge_bad_value_is_shortened():
    line = _error({**MINIMAL, "labels": "x" * 100_000})
    assert line == f"manifest: labels: {_shown('x' * 100_000)} is not a list" and len(line) < 100


@pytest.mark.parametrize("data, line", [
    (b"x" * (m.MAX_MANIFEST_BYTES + 1), f"manifest: {m.MAX_MANIFEST_BYTES + 1} bytes exceeds the 1048576-byte limit"),
    (b"\xff\xfe", "manifest: not valid UTF-8"),
    (b'{"acKind":\n  "ImageManifest",,}', "manifest: invalid JSON at line 2 column 19: Expecting property name "
                                           "enclosed in double quotes"),
    (b"[1, 2]", "manifest: top level is not a JSON object"),
    (b'{"acKind": NaN}', "manifest: invalid JSON: NaN is not a JSON value"),
    (b'{"size": 1e999}', "manifest: invalid JSON: number 1e999 is out of range"),
    (b'{"size": 1' + b"0" * 5000 + b"}", "manifest: invalid JSON: a number has too many digits"),
    (b'{"x": ' + b"[" * 65 + b"]" * 65 + b"}", "manifest: nested deeper than 64 levels"),
    (b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "manifest: nested deeper than 64 levels"),
])
def test_byte_level_errors(data, line):
    with pytest.raises(ManifestError) as info:
        parse_manifest(data)
    assert str(info.value) == line


# ---- random JSON never escapes as anything but ManifestError -----------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
KEYS = st.sampled_from(["name", "value", "exec", "user", "group", "set", "limit", "port", "count", "path",
                        "imageName", "labels", "isolators", "environment", "eventHandlers", "ports"])
MANIFEST_LIKE = st.recursive(  # JSON biased towards the manifest's own keys, to get past the first checks
    JSON, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=20)
ISOLATOR_NAMES = st.sampled_from(sorted(m.SPEC_ISOLATORS) + ["example.com/other"])


def _only_manifest_errors(obj: object) -> None:
    try:
        im = _parse(obj)
    except ManifestError as e:
        assert "\n" not in str(e) and str(e).startswith("manifest: ")
    else:
        assert parse_manifest(json.dumps(obj).encode(), validate=False) == im


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    JSON,
    MANIFEST_LIKE.map(lambda v: {**MINIMAL, **v} if isinstance(v, dict) else v),
    MANIFEST_LIKE.map(lambda v: {**MINIMAL, "app": v}),
    MANIFEST_LIKE.map(lambda v: {**MINIMAL, "app": {**MINIMAL["app"], **v}} if isinstance(v, dict) else v),
    MANIFEST_LIKE.map(lambda v: {**MINIMAL, "labels": v}),
    st.lists(MANIFEST_LIKE).map(lambda v: {**MINIMAL, "labels": v, "dependencies": [{"imageName": "b", "labels": v}]}),
    st.tuples(ISOLATOR_NAMES, MANIFEST_LIKE).map(lambda t: _iso(*t)),
))
def test_random_json_only_ever_raises_manifest_error(obj):
    _only_manifest_errors(obj)


# ---- the schema file and its Python side -------------------------------------------------------

HANDLED_KEYWORDS = {"$schema", "$comment", "$defs", "$ref", "title", "description", "type", "required",
                    "properties", "additionalProperties", "items", "prefixItems", "allOf", "if", "then", "not",
                    "const", "enum", "pattern", "minimum", "maximum", "minItems", "minLength"}


def _keywords(schema: object):
    if isinstance(schema, dict):
        for key, value in schema.items():
            yield key
            if key in ("properties", "$defs"):
                for sub in value.values():
                    yield from _keywords(sub)
            elif key not in ("const", "enum"):
                yield from _keywords(value)
    elif isinstance(schema, list):
        for sub in schema:
            yield from _keywords(sub)


def test_schema_is_valid_draft_2020_12_and_uses_only_keywords_with_error_wording():
    from jsonschema import Draft202012Validator
    schema = m._schema()
    Draft202012Validator.check_schema(schema)
    assert set(_keywords(schema)) <= HANDLED_KEYWORDS
    for name, sub in schema["$defs"].items():  # every pattern has the noun its errors use
        for key in _keywords(sub):
            if key == "pattern":
                assert "$comment" in json.dumps(sub), name


def test_python_name_patterns_match_the_schema():
    defs = m._schema()["$defs"]
    assert m._regex(defs["acIdentifier"]["pattern"]).pattern == names.AC_IDENTIFIER.pattern
    assert m._regex(defs["acName"]["pattern"]).pattern == names.AC_NAME.pattern
    assert not names.AC_NAME.match("web\n")


def test_validate_false_builds_the_same_dataclasses_without_importing_jsonschema():
    code = ("import json, sys\n"
            "from kvmpod.image.manifest import parse_manifest\n"
            f"im = parse_manifest({json.dumps(json.dumps(SPEC_EXAMPLE))}.encode(), validate=False)\n"
            "assert im.app.ports[1].count == 1000, im\n"
            "assert 'jsonschema' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    data = json.dumps(SPEC_EXAMPLE).encode()
    assert parse_manifest(data, validate=False) == parse_manifest(data)


def test_validate_false_turns_a_malformed_stored_manifest_into_a_manifest_error():
    with pytest.raises(ManifestError, match="stored manifest is malformed"):
        parse_manifest(b'{"name": "t", "app": []}', validate=False)


# ---- check_runnable ----------------------------------------------------------------------------

@pytest.mark.parametrize("labels, line", [
    ({"os": "linux", "arch": "aarch64"}, 'manifest: labels: arch "aarch64" cannot run in a kvmpod VM (it runs linux/amd64 images)'),
    ({"os": "darwin", "arch": "x86_64"}, 'manifest: labels: os "darwin" cannot run in a kvmpod VM (it runs linux/amd64 images)'),
    ({"arch": "i386"}, 'manifest: labels: arch "i386" cannot run in a kvmpod VM (it runs linux/amd64 images)'),
])
def test_check_runnable_refuses_other_os_or_arch(labels, line):
    with pytest.raises(ManifestError) as info:
        check_runnable(ImageManifest("t", labels, None, {}))
    assert str(info.value) == line


@pytest.mark.parametrize("labels", [{}, {"os": "linux"}, {"os": "linux", "arch": "amd64"}, {"version": "1"}])
def test_check_runnable_accepts_linux_amd64_and_unlabelled_images(labels):
    check_runnable(ImageManifest("t", labels, None, {}))


# ---- build_manifest ----------------------------------------------------------------------------

def test_build_manifest_writes_ports_mount_points_and_isolators_that_parse_back():
    ports = [Port("http", "tcp", 8080), Port("dns", "udp", 53, 2, True)]
    mounts = [MountPoint("data", "/var/data", read_only=True)]
    isolators = [Isolator("resource/memory", {"limit": "512Mi"})]
    built = build_manifest("example.com/web", exec_=["/bin/web"], ports=ports, mount_points=mounts, isolators=isolators)
    app = _parse(built).app
    assert (app.ports, app.mount_points, app.isolators) == (ports, mounts, isolators)
    assert built["app"]["ports"][1] == {"name": "dns", "protocol": "udp", "port": 53, "count": 2, "socketActivated": True}


@pytest.mark.parametrize("kwargs, line", [
    ({"ports": [Port("HTTP", "tcp", 80)]}, 'manifest: app.ports[0].name: "HTTP" is not an AC Name'),
    ({"mount_points": [MountPoint("data", "var")]}, 'manifest: app.mountPoints[0].path: "var" is not an absolute path'),
    ({"isolators": [Isolator("os/linux/cpu-shares", 0)]}, "manifest: app.isolators[0].value: 0 is not between 2 and 262144"),
    ({"labels": {"arch": "sparc"}}, 'manifest: labels[1].value: "sparc" is not an arch of os "linux" '
                                    "(amd64, i386, aarch64, aarch64_be, armv6l, armv7l, armv7b, ppc64, ppc64le, s390x)"),
])
def test_build_manifest_refuses_what_parse_refuses(kwargs, line):
    with pytest.raises(ManifestError) as info:
        build_manifest("example.com/web", exec_=["/bin/web"], **kwargs)
    assert str(info.value) == line
