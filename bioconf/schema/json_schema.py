"""JSON Schema (draft 2020-12) of ``ModelConfig`` for UIs that render a form from it.

Every property carries a title, megatron's description, its default and type (with ``enum``
for names); ``x-group`` and ``x-level`` (basic/advanced) place it in a form. The top-level
``x-groups`` gives the groups' order and titles.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode

from bioconf.schema.groups import GROUPS
from bioconf.schema.model import BIONEMO_ONLY_FIELDS, ModelConfig

DRAFT = "https://json-schema.org/draft/2020-12/schema"


class _Generator(GenerateJsonSchema):
    schema_dialect = DRAFT


def json_schema(mode: JsonSchemaMode = "validation") -> dict[str, Any]:
    """The JSON Schema of ModelConfig, with form groups."""
    schema = ModelConfig.model_json_schema(schema_generator=_Generator, mode=mode)
    schema["$schema"] = DRAFT
    schema["$id"] = "https://bioconf.dev/schema/model-config.json"
    schema["description"] = (ModelConfig.__doc__ or "").split("\n\n")[0].replace("\n", " ").strip()
    # A UI can offer the field names as choices for the keep-list.
    schema["properties"]["override_parent_fields"]["items"]["enum"] = sorted(
        ModelConfig.model_fields.keys() | BIONEMO_ONLY_FIELDS
    )
    schema["x-groups"] = [{"name": name, "title": title} for name, title in GROUPS.items()]
    return schema
