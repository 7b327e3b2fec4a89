"""Jinja rendering of the templates in templates/: shape in the template, decisions in Python."""

from __future__ import annotations

from functools import lru_cache

import jinja2

from ..resources import templates_dir


@lru_cache(maxsize=None)
def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              autoescape=False)


def render(template: str, **values) -> str:
    return _env().get_template(template).render(**values)
