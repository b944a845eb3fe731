"""The building blocks of the configuration schema: the frozen base model and the value types.

Every type carries the rule its values obey (errors.Rule); errors.validate reports a broken one as
"file: key: rule". Numbers are strict: YAML's ``yes`` or ``"5"`` is not an integer.
"""

from __future__ import annotations

import os
import re
from types import MappingProxyType
from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from proxy.config.errors import Rule

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
HEX_DIGEST = r"^[0-9a-f]{64}$"


class Section(BaseModel):
    """A configuration section: unknown keys refused, frozen once validated, inputs kept out of errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def Int(low: int, high: int) -> Any:  # noqa: N802 - a type, read as one
    return Annotated[int, Field(strict=True, ge=low, le=high), Rule(f"must be an integer between {low} and {high}")]


def Number(low: float, high: float) -> Any:  # noqa: N802
    return Annotated[float, Field(strict=True, ge=low, le=high), Rule(f"must be a number between {low} and {high}")]


def OneOf(*choices: str) -> Any:  # noqa: N802
    return Annotated[Literal[choices], Rule(f"must be one of {', '.join(choices)}")]


Bool = Annotated[bool, Field(strict=True), Rule("must be true or false")]
Text = Annotated[str, Field(strict=True, min_length=1), Rule("must be a non-empty string")]
# A share of something: (0, 1], or [0, 1] where none at all is allowed.
Fraction = Annotated[float, Field(strict=True, gt=0, le=1), Rule("must be a number greater than 0 and at most 1")]
Share = Annotated[float, Field(strict=True, ge=0, le=1), Rule("must be a number between 0 and 1")]
Digests = Annotated[frozenset[Annotated[str, Field(strict=True, pattern=HEX_DIGEST)]],
                    Rule("must be a list of lowercase sha256 hex digests")]


def interpolate(value: Any) -> Any:
    """Replace ${VAR} and ${VAR:-default} from the environment; secrets stay out of YAML."""
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set")

    return _ENV_REF.sub(substitute, value)


# A string that may name environment variables (${VAR}, ${VAR:-default}).
Env = BeforeValidator(interpolate)


def _frozen(value: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(value))


Frozen = AfterValidator(_frozen)  # a validated mapping, read-only
