"""`kvmpod run IMG1 IMG2`: rkt's multi-image form, one app per image, each with its app flags."""

from __future__ import annotations

from tests.e2e.conftest import the_error


def test_images_one_after_another_make_a_pod(kvmpod, busybox_aci):
    result = kvmpod.run("--net", "none", str(busybox_aci), "--exec", "/bin/sh", "--", "-c", "echo one", "---",
                        str(busybox_aci), "--name", "two", "--exec", "/bin/echo", "-n", "two")
    assert result.returncode == 125 and "run: -n (after " in the_error(result)   # not an app flag: said before boot
    result = kvmpod.run("--net", "none", str(busybox_aci), "--exec", "/bin/sh", "--", "-c", "echo one; exit 0", "---",
                        str(busybox_aci), "--name", "two", "--exec", "/bin/true",
                        str(busybox_aci), "--name", "three", "--exec", "/bin/sh", "--", "-c", "sleep 1; exit 4")
    assert result.returncode == 4, result.stderr.decode()
    assert result.stdout == b"one\n"
