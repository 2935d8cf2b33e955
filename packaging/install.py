#!/usr/bin/python3
"""`make install` / `make uninstall`: kvmpod as a system program, in a venv of its own (docs/install.md).

    python3 packaging/install.py install   [--prefix /usr/local] [--destdir DIR] [--wheel FILE]
    python3 packaging/install.py uninstall [--prefix /usr/local] [--destdir DIR]

What `install` puts under PREFIX (staged under DESTDIR when given, as packagers do):

    lib/kvmpod/venv/                     a venv of its own holding the kvmpod wheel and its dependencies
    lib/kvmpod/kvmpod-agent, kvmpod-relay   the static programs (copies of the wheel's)
    lib/kvmpod/installed-files           what was installed, for `uninstall`
    bin/<script>                         every console script of the kvmpod package -> ../lib/kvmpod/venv/bin/
    share/man/man1/<script>.1            man pages (help2man, from each script's --help)
    share/bash-completion/completions/kvmpod, share/zsh/{vendor-completions|site-functions}/_kvmpod
    share/doc/kvmpod/                    README.md, docs/*.md, examples/kvmpod.toml (a commented sample)

A venv records its own path (script shebangs, activate, pyvenv.cfg, compiled .pyc). Without DESTDIR it
is made where it stays. With DESTDIR it is made in DESTDIR/PREFIX and then relocated: every reference to
the staging path is rewritten to the final one and the .pyc are recompiled with their final paths; a
reference left anywhere fails the install. The console scripts are read from the installed package's
entry points, so a script added to pyproject.toml is installed without editing this file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent
MANIFEST = "lib/kvmpod/installed-files"
VENV = "lib/kvmpod/venv"
PROGRAMS = ("kvmpod-agent", "kvmpod-relay")


class InstallError(Exception):
    pass


def run(cmd: list[str], **kwargs: object) -> str:
    """Run cmd (in /: a Python started in the checkout would import the checkout's kvmpod)."""
    kwargs.setdefault("cwd", "/")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError as e:
        raise InstallError(f"{cmd[0]} not found") from e
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise InstallError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' / '.join(lines[-3:])}")
    return proc.stdout


def build_wheel(out: Path) -> Path:
    """The wheel, built from an sdist of the source tree (python3-build): what is installed is exactly
    what the sdist and wheel carry, not whatever lies around in the checkout."""
    print("install: building the kvmpod wheel (sdist, then the wheel from it)", flush=True)
    run([sys.executable, "-m", "build", "--outdir", str(out), str(SOURCE)])
    wheels = sorted(out.glob("kvmpod-*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"python3 -m build left {len(wheels)} wheels in {out}")
    return wheels[0]


def console_scripts(python: Path) -> list[str]:
    code = ("from importlib.metadata import distribution\n"
            "print('\\n'.join(sorted(e.name for e in distribution('kvmpod').entry_points "
            "if e.group == 'console_scripts')))")
    return run([str(python), "-c", code]).split()


def relocate(staged: Path, final: Path) -> None:
    """Make a venv built at `staged` right for `final`: text references rewritten, .pyc recompiled."""
    old, new = str(staged).encode(), str(final).encode()
    for path in staged.rglob("*"):
        if path.is_symlink():
            target = os.readlink(path)
            if target.startswith(str(staged)):
                path.unlink()
                path.symlink_to(str(final) + target[len(str(staged)):])
            continue
        if not path.is_file() or path.suffix == ".pyc":
            continue
        data = path.read_bytes()
        if old in data and b"\0" not in data[:8192]:  # text only: scripts, activate*, pyvenv.cfg, RECORD
            path.write_bytes(data.replace(old, new))
    for cache in list(staged.rglob("__pycache__")):
        shutil.rmtree(cache)
    lib = staged / "lib"
    run([str(staged / "bin" / "python"), "-m", "compileall", "-q", "-s", str(staged), "-p", str(final), str(lib)])
    left = [str(p) for p in staged.rglob("*") if p.is_file() and not p.is_symlink() and old in p.read_bytes()]
    if left:
        raise InstallError(f"the venv still names its staging path {staged} in {left[0]} "
                           f"(and {len(left) - 1} more)")


def man_page(script: str, python: Path, venv_bin: Path, out: Path, version: str) -> bool:
    """help2man from the script's --help; kvmpod's page also gets every command's help."""
    include = None
    if script == "kvmpod":
        code = ("from kvmpod.cli import build_parser\n"
                "import argparse\n"
                "p = build_parser()\n"
                "print('[COMMANDS]')\n"
                "def walk(parser, path):\n"
                "    for a in parser._actions:\n"
                "        if isinstance(a, argparse._SubParsersAction):\n"
                "            for name, sub in a.choices.items():\n"
                "                if name.startswith('__'): continue\n"
                "                print('.SS ' + path + ' ' + name)\n"
                "                print('.nf')\n"
                "                print(sub.format_help().replace('\\\\', '\\\\e').replace('\\n.', '\\n\\\\&.'))\n"
                "                print('.fi')\n"
                "                walk(sub, path + ' ' + name)\n"
                "walk(p, 'kvmpod')\n")
        include = out.parent / f".{script}.h2m"
        include.write_text(run([str(python), "-c", code], env={**os.environ, "COLUMNS": "100"}))
    cmd = ["help2man", "--no-info", f"--version-string={version}",
           "-n", "run App Container images, each in its own lightweight VM" if script == "kvmpod"
           else f"part of kvmpod {version}", "-o", str(out)]
    if include is not None:
        cmd += ["--include", str(include)]
    try:
        run([*cmd, str(venv_bin / script)], env={**os.environ, "COLUMNS": "100"})
    except InstallError as e:
        print(f"install: warning: no man page for {script}: {e}", file=sys.stderr)
        return False
    finally:
        if include is not None:
            include.unlink(missing_ok=True)
    return True


def install(prefix: Path, destdir: str, wheel: Path | None) -> None:
    root = Path(destdir + str(prefix)) if destdir else prefix
    os.umask(0o022)  # installed software is readable by every user, whatever root's umask is
    if (root / MANIFEST).exists():
        print(f"install: replacing the kvmpod installed in {root}", flush=True)
        uninstall(prefix, destdir, quiet=True)
    staged, final = root / VENV, prefix / VENV
    installed: list[str] = []          # paths relative to PREFIX
    created_dirs: list[str] = []

    def make_dir(rel: str) -> Path:
        path = root / rel
        missing = []
        probe = path
        while not probe.exists() and probe != root:
            missing.append(probe)
            probe = probe.parent
        path.mkdir(parents=True, exist_ok=True)
        created_dirs.extend(str(p.relative_to(root)) for p in missing)
        return path

    def add_file(rel: str, data: bytes | None = None, source: Path | None = None, mode: int = 0o644) -> None:
        path = make_dir(str(Path(rel).parent)) / Path(rel).name
        if source is not None:
            shutil.copyfile(source, path)
        else:
            path.write_bytes(data or b"")
        path.chmod(mode)
        installed.append(rel)

    try:
        version, scripts = _install_into(root, prefix, staged, final, wheel, make_dir, add_file, installed)
    except BaseException:
        # nothing half-written: what was made so far goes again
        _remove(root, [("tree", VENV), *(("file", rel) for rel in installed), *(("dir", d) for d in created_dirs)])
        raise
    manifest = [f"tree {VENV}", *(f"file {rel}" for rel in installed), *(f"dir {d}" for d in created_dirs)]
    (root / MANIFEST).write_text("".join(f"{line}\n" for line in manifest))
    print(f"install: kvmpod {version} installed in {root} ({', '.join(scripts)} in {prefix / 'bin'})")


def _install_into(root: Path, prefix: Path, staged: Path, final: Path, wheel: Path | None,
                  make_dir: Callable[[str], Path], add_file: Callable[..., None],
                  installed: list[str]) -> tuple[str, list[str]]:
    with tempfile.TemporaryDirectory(prefix="kvmpod-install-") as tmp:
        wheel = wheel or build_wheel(Path(tmp))
        make_dir(str(Path(VENV).parent))
        print(f"install: creating the venv {final}", flush=True)
        run([sys.executable, "-m", "venv", str(staged)])
        python = staged / "bin" / "python"
        run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)])
        site = Path(run([str(python), "-c", "import kvmpod, os; print(os.path.dirname(kvmpod.__file__))"]).strip())
        version = run([str(python), "-c", "import kvmpod; print(kvmpod.__version__)"]).strip()
        for direct_url in site.parent.glob("kvmpod-*.dist-info/direct_url.json"):
            direct_url.unlink()  # it names the temporary wheel file
        scripts = console_scripts(python)
        if "kvmpod" not in scripts:
            raise InstallError(f"the wheel {wheel} has no kvmpod console script")

        for name in PROGRAMS:
            add_file(f"lib/kvmpod/{name}", source=site / "libexec" / name, mode=0o755)
        for script in scripts:
            link = make_dir("bin") / script
            if link.is_symlink() or link.exists():
                raise InstallError(f"{link} exists and is not kvmpod's: remove it first")
            link.symlink_to(os.path.relpath(staged / "bin" / script, link.parent))
            installed.append(f"bin/{script}")
        for script in scripts:
            page = make_dir("share/man/man1") / f"{script}.1"
            if man_page(script, python, staged / "bin", page, version):
                installed.append(f"share/man/man1/{script}.1")
        kvmpod = [str(python), "-m", "kvmpod"]
        add_file("share/bash-completion/completions/kvmpod", run([*kvmpod, "completion", "bash"]).encode())
        zsh_dir = "share/zsh/vendor-completions" if str(prefix) == "/usr" else "share/zsh/site-functions"
        add_file(f"{zsh_dir}/_kvmpod", run([*kvmpod, "completion", "zsh"]).encode())
        add_file("share/doc/kvmpod/examples/kvmpod.toml", source=SOURCE / "packaging" / "kvmpod.toml")
        add_file("share/doc/kvmpod/README.md", source=SOURCE / "README.md")
        for doc in sorted((SOURCE / "docs").glob("*.md")):
            add_file(f"share/doc/kvmpod/{doc.name}", source=doc)

        if staged != final:
            print(f"install: relocating the venv from {staged} to {final}", flush=True)
            relocate(staged, final)
    return version, scripts


def uninstall(prefix: Path, destdir: str, quiet: bool = False) -> None:
    """Remove exactly what `install` recorded in lib/kvmpod/installed-files, and the directories it made
    that are empty now."""
    root = Path(destdir + str(prefix)) if destdir else prefix
    manifest = root / MANIFEST
    try:
        lines = manifest.read_text().splitlines()
    except FileNotFoundError:
        raise InstallError(f"no kvmpod installed in {root}: {manifest} does not exist") from None
    entries = [line.split(" ", 1) for line in lines if line.strip()]
    for kind, rel in entries:
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise InstallError(f"{manifest}: {rel!r} is not a path inside {root}")
    manifest.unlink()
    _remove(root, [(kind, rel) for kind, rel in entries])
    if not quiet:
        print(f"uninstall: kvmpod removed from {root}")


def _remove(root: Path, entries: list[tuple[str, str]]) -> None:
    for kind, rel in entries:
        path = root / rel
        if kind == "tree":
            shutil.rmtree(path, ignore_errors=True)
        elif kind == "file" and (path.is_symlink() or path.exists()):
            path.unlink()
    dirs = sorted({rel for kind, rel in entries if kind == "dir"} | {"lib/kvmpod"}, key=lambda d: -d.count("/"))
    for rel in dirs:
        try:
            (root / rel).rmdir()
        except OSError:
            pass  # not empty (something else is there now) or gone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packaging/install.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "uninstall"])
    parser.add_argument("--prefix", default="/usr/local", help="where kvmpod goes (default /usr/local)")
    parser.add_argument("--destdir", default="", help="stage the install under this directory (packagers)")
    parser.add_argument("--wheel", type=Path, help="install this wheel instead of building one")
    args = parser.parse_args(argv)
    prefix = Path(args.prefix)
    if not prefix.is_absolute():
        print(f"install: error: PREFIX must be an absolute path, not {args.prefix!r}", file=sys.stderr)
        return 2
    if args.destdir and not Path(args.destdir).is_absolute():
        print(f"install: error: DESTDIR must be an absolute path, not {args.destdir!r}", file=sys.stderr)
        return 2
    destdir = args.destdir.rstrip("/")
    try:
        if args.action == "install":
            install(prefix, destdir, args.wheel)
        else:
            uninstall(prefix, destdir)
    except (InstallError, OSError) as e:
        print(f"{args.action}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
