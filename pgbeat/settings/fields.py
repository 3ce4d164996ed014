"""The field types of the schema: the rules of pgbeat.settings.rules as pydantic validators."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

from pgbeat.settings.rules import (
    _path_not_blank,
    _validate_listen,
    validate_database_name,
    validate_node_name,
    validate_not_blank,
    validate_tier_name,
)

Name = Annotated[str, AfterValidator(validate_not_blank)]
DatabaseName = Annotated[str, AfterValidator(validate_database_name)]
NodeName = Annotated[str, AfterValidator(validate_node_name)]
TierName = Annotated[str, AfterValidator(validate_tier_name)]
ConfigPath = Annotated[Path, BeforeValidator(_path_not_blank)]
Listen = Annotated[str, AfterValidator(_validate_listen)]
