"""Names that end up in paths, checked against one pattern each where they are parsed.

A run's name may come from a person (`--name`, a YAML, `--set name=...`) or, at a site, from the server
(the round spec carries the resolved config): either way it is checked here before anything is built from
it. A site files its state under the run's uid only (content-free, checked here too), never under a name
the server chose. `inside` is the last line of defence where a path is joined from parts.

    >>> check_run_name("compare/arms/fedavg-1a2b")
    'compare/arms/fedavg-1a2b'
    >>> check_run_name("../escaped")
    Traceback (most recent call last):
    ...
    ValueError: run name '../escaped': each part must be letters, digits, '.', '-' or '_' ...
"""

from __future__ import annotations

import re
from pathlib import Path

PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # one path component: no '/', never '.' or '..', no leading '-'
RUN_NAME = re.compile(rf"{PART}(/{PART}){{0,5}}")  # a run, or a study's run below its own (seed2/arch/setup)
RUN_UID = re.compile(r"[0-9a-f]{12}")  # server/run.py: uuid4().hex[:12], kept across resumes
SITE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")  # a site YAML's `name:`
# a site as its node reports it: a YAML's name, or a scenario's part of one (`eyepacs-camera1`)
REPORTED_SITE = re.compile(r"[a-z0-9][a-z0-9_-]{0,79}")
TASK_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")  # a fine-tuning task (dr, mmac, ad, pd)
LABEL = re.compile(PART)  # a model's label in `--model NAME=PATH`


def check_run_name(value: str) -> str:
    """`value` if it is a run name: parts of letters, digits, '.', '-', '_' joined by '/'. Else ValueError."""
    if not isinstance(value, str) or not RUN_NAME.fullmatch(value):
        raise ValueError(
            f"run name {value!r}: each part must be letters, digits, '.', '-' or '_' (at most 64, not "
            "starting with '.' or '-'), parts joined by '/', e.g. 'demo' or 'study-2'"
        )
    return value


def check_run_uid(value: str) -> str:
    if not isinstance(value, str) or not RUN_UID.fullmatch(value):
        raise ValueError(f"run uid {value!r}: expected 12 lower-case hex digits")
    return value


def check_reported_site(value: str) -> str:
    """`value` if it can name a site on the server (its files, tables, MLflow keys); else ValueError."""
    if not isinstance(value, str) or not REPORTED_SITE.fullmatch(value):
        raise ValueError(f"site {value!r}: expected lower-case letters, digits, '-' or '_' (at most 80)")
    return value


def check_task(value: str) -> str:
    if not isinstance(value, str) or not TASK_NAME.fullmatch(value):
        raise ValueError(f"task {value!r}: expected lower-case letters, digits or '_' (at most 32)")
    return value


def inside(base: Path, *parts: str) -> Path:
    """`base/parts...`, refused (ValueError) unless it stays below `base` once resolved: a checked name
    cannot leave it, and neither can a symlink planted below `base`."""
    path = base.joinpath(*parts)
    if not path.resolve().is_relative_to(base.resolve()):
        raise ValueError(f"{path} leaves {base}")
    return path
