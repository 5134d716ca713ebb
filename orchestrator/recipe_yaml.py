"""The YAML dialect of recipes and overrides: YAML 1.2's plain scalars where YAML 1.1 surprises."""

from __future__ import annotations

import re

import yaml


class RecipeLoader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 integers (an N:M pattern like 2:4 stays a string) and without its
    yes/no/on/off booleans (output.name=off stays the name "off")."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:bool")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0o?[0-7_]+)$"), list("-+0123456789")
)
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def parse_yaml(text: str):
    return yaml.load(text, Loader=RecipeLoader)
