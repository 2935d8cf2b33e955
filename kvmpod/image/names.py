"""appc's name grammars (spec/types.md: AC Identifier, AC Name), apart from the manifest so that the command
line can check a name without importing the manifest's dataclasses and schema (`kvmpod --help` stays fast)."""

from __future__ import annotations

import re

AC_IDENTIFIER = re.compile(r"^[a-z0-9]+([-._~/][a-z0-9]+)*\Z")
AC_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*\Z")
