"""Render the jinja2 templates shipped in planc.templates (the top-level `templates/` folder)."""
from __future__ import annotations

from importlib import resources


def _environment():
    import jinja2  # only when a bundle is written: the server never renders

    root = resources.files("planc.templates")
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(root)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, autoescape=False)


def render(template: str, **values) -> str:
    return _environment().get_template(template).render(**values)
