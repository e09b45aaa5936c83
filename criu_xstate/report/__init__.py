"""Rendering in one place: the text (text.py) and JSON (json.py) of show, plan and apply.

Commands and the hook compute; this package only formats what they computed. Schemas: README
("Plan JSON and reason codes").
"""

from __future__ import annotations

from criu_xstate.report.json import dumps, plan_json, plans_json, show_json
from criu_xstate.report.text import container_line, render_multi_text, render_plan_text, show_text

__all__ = [
    "container_line",
    "dumps",
    "plan_json",
    "plans_json",
    "render_multi_text",
    "render_plan_text",
    "show_json",
    "show_text",
]
