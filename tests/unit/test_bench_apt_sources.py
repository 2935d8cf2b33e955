"""bench/apt_sources.py: the image bench's debootstrap mirror comes from the machine's apt sources,
in both of apt's formats (one-line sources.list, deb822 .sources), or one clear error."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "apt_sources.py"
_spec = importlib.util.spec_from_file_location("bench_apt_sources", _PATH)
assert _spec is not None and _spec.loader is not None
apt_sources = importlib.util.module_from_spec(_spec)
sys.modules["bench_apt_sources"] = apt_sources  # dataclasses look their module up while the class is made
_spec.loader.exec_module(apt_sources)


def _etc(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "etc" / "apt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_one_line_format_with_options_comments_and_other_suites(tmp_path):
    root = _etc(tmp_path, {"sources.list": """\
# the security archive first: it does not serve bookworm itself
deb http://security.example.org/debian-security bookworm-security main
deb-src http://src.example.org/debian bookworm main
deb [ arch=amd64 signed-by=/usr/share/keyrings/x.gpg ] http://mirror.example.org/debian/ bookworm main contrib # ours
deb http://later.example.org/debian bookworm main
"""})
    assert apt_sources.debian_mirror("bookworm", root) == "http://mirror.example.org/debian"


def test_one_line_format_skips_disabled_and_componentless_lines(tmp_path):
    root = _etc(tmp_path, {"sources.list": """\
deb [enabled=no] http://off.example.org/debian bookworm main
deb http://contrib-only.example.org/debian bookworm contrib
deb http://on.example.org/debian bookworm main
"""})
    assert apt_sources.debian_mirror("bookworm", root) == "http://on.example.org/debian"


def test_deb822_format_with_continuations_case_and_enabled(tmp_path):
    root = _etc(tmp_path, {"sources.list.d/debian.sources": """\
Types: deb
URIs: http://disabled.example.org/debian
Suites: bookworm
Components: main
Enabled: no

# a comment between paragraphs
types: deb-src deb
uris: https://deb822.example.org/debian
suites: bookworm-updates
 bookworm
components: main
signed-by: /usr/share/keyrings/debian-archive-keyring.gpg
"""})
    assert apt_sources.debian_mirror("bookworm", root) == "https://deb822.example.org/debian"


def test_apt_reading_order_and_ignored_file_names(tmp_path):
    root = _etc(tmp_path, {
        "sources.list.d/b.list": "deb http://b.example.org/debian bookworm main\n",
        "sources.list.d/a.sources": "Types: deb\nURIs: http://a.example.org/debian\nSuites: bookworm\n"
                                    "Components: main\n",
        "sources.list.d/0.list.disabled-by-farm": "deb http://ignored.example.org/debian bookworm main\n",
    })
    assert apt_sources.debian_mirror("bookworm", root) == "http://a.example.org/debian"
    _etc(tmp_path, {"sources.list": "deb http://first.example.org/debian bookworm main\n"})
    assert apt_sources.debian_mirror("bookworm", root) == "http://first.example.org/debian"


def test_no_source_for_the_suite_is_one_clear_error(tmp_path):
    root = _etc(tmp_path, {"sources.list.d/debian.sources":
                           "Types: deb\nURIs: http://m.example.org/debian\nSuites: trixie\nComponents: main\n"})
    with pytest.raises(apt_sources.NoMirror) as e:
        apt_sources.debian_mirror("bookworm", root)
    message = str(e.value)
    assert "bookworm main" in message and "debian.sources" in message and "\n" not in message


def test_no_apt_configuration_at_all(tmp_path):
    with pytest.raises(apt_sources.NoMirror, match="no enabled 'deb' apt source serves bookworm main"):
        apt_sources.debian_mirror("bookworm", tmp_path)
