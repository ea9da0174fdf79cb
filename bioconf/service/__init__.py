"""The config service (``bioconf serve``; the ``service`` extra): validate and resolve configs over
HTTP for pipelines that cannot run Python, the JSON Schema for UIs, and an editor page.

Kept apart from ``bioconf.schema``, which never imports FastAPI.
"""

from bioconf.service.app import ServiceSettings, create_app

__all__ = ["ServiceSettings", "create_app"]
