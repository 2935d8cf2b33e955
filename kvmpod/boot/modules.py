"""Which kernel modules the guest needs, and in what order to load them.

The guest has no modprobe: the agent loads the .ko files listed in the initrd's
/etc/kvmpod/modules one after the other, so this module computes that list on the host from
the kernel's modules.dep (dependencies first, each module once).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from kvmpod.errors import KernelError

# The modules the guest loads (besides their dependencies): a data file of the package, so that an
# installed kvmpod and a checkout read the same list.
MODULE_LIST = Path(__file__).resolve().parent / "data" / "guest-modules.txt"

_KO_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path_or_name: str) -> str:
    """The canonical module name: basename without .ko[.xz|.zst|.gz], `-` turned into `_`."""
    name = path_or_name.rsplit("/", 1)[-1]
    for suffix in _KO_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def read_modules_dep(modules_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """Parse modules.dep: {canonical name: (relative .ko path, [relative dependency paths])}."""
    dep_file = Path(modules_dir) / "modules.dep"
    try:
        text = dep_file.read_text()
    except FileNotFoundError as cause:
        raise KernelError(f"no modules.dep in {modules_dir} (run depmod for this kernel)") from cause
    except OSError as e:
        raise KernelError(f"cannot read {dep_file}: {e.strerror}") from e
    table: dict[str, tuple[str, list[str]]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        target, sep, deps = line.partition(":")
        if not sep:
            raise KernelError(f"malformed line {lineno} in {dep_file}: {line.strip()[:80]!r}")
        target = target.strip()
        table.setdefault(module_name(target), (target, deps.split()))
    return table


def read_modules_builtin(modules_dir: Path) -> set[str]:
    """Canonical names of the modules built into the kernel (empty if modules.builtin is absent)."""
    try:
        text = (Path(modules_dir) / "modules.builtin").read_text()
    except FileNotFoundError:
        return set()
    except OSError as e:
        raise KernelError(f"cannot read {Path(modules_dir) / 'modules.builtin'}: {e.strerror}") from e
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def resolve_relative(modules_dir: Path, names: Iterable[str]) -> list[str]:
    """Like resolve_modules, but the paths are relative to modules_dir, as in modules.dep."""
    table = read_modules_dep(modules_dir)
    builtin: set[str] | None = None
    by_path = {path: deps for path, deps in table.values()}
    order: list[str] = []
    done: set[str] = set()

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if path in done:
            return
        if path in chain:
            raise KernelError(f"dependency loop in {Path(modules_dir) / 'modules.dep'}: {' -> '.join(chain + (path,))}")
        if path not in by_path:
            raise KernelError(f"{path} is a dependency in {Path(modules_dir) / 'modules.dep'} but has no entry there")
        # modules.dep lists the whole closure, deepest dependencies last; visiting them in
        # reverse and recursing gives a correct topological order whatever depmod's order.
        for dep in reversed(by_path[path]):
            visit(dep, chain + (path,))
        done.add(path)
        order.append(path)

    for name in names:
        canon = module_name(name)
        if canon in table:
            visit(table[canon][0], ())
            continue
        if builtin is None:
            builtin = read_modules_builtin(modules_dir)
        if canon not in builtin:
            raise KernelError(f"kernel module {name!r} is neither in {Path(modules_dir) / 'modules.dep'} nor built in")
    return order


def resolve_modules(modules_dir: Path, names: Iterable[str]) -> list[Path]:
    """The absolute .ko paths for `names` and their dependencies, in load order, each once.

    Names match with `-` and `_` equivalent. Built-in modules (modules.builtin) are skipped;
    a name that is neither in modules.dep nor built in raises KernelError.
    """
    root = Path(modules_dir).resolve()
    return [root / rel for rel in resolve_relative(root, names)]


def module_list_file() -> Path:
    """The package's kvmpod/boot/data/guest-modules.txt."""
    if not MODULE_LIST.is_file():
        raise KernelError(f"guest module list not found: {MODULE_LIST} (an incomplete kvmpod installation)")
    return MODULE_LIST


def parse_module_list(text: str) -> list[str]:
    """One module name per line; `#` starts a comment; blank lines are ignored."""
    names: list[str] = []
    for line in text.splitlines():
        names.extend(line.split("#", 1)[0].split())
    return names


def guest_module_names(list_file: Path | None = None) -> list[str]:
    """The module names in guest-modules.txt, in file order."""
    path = list_file or module_list_file()
    try:
        return parse_module_list(path.read_text())
    except OSError as e:
        raise KernelError(f"cannot read guest module list {path}: {e.strerror}") from e
